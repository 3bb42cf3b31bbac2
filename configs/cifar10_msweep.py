"""Section 6.1's pool of models: ViT-S/32 on CIFAR-10 from scratch, sweeping the perturbation
batch size m (paper Table C.1, rows "ViT-S/32, CIFAR FORGET VS. ACC"; Figure 2).

Arg "perturbation,m[,local]": perturbation in {steep, obf, obf_gamma0}, m = 2^k with k = 0..9:

  for p in steep obf obf_gamma0; do for m in 1 2 4 8 16 32 64 128 256 512; do
    python main.py --workdir=.../$p-$m --config=configs/cifar10_msweep.py:$p,$m; done; done
  python main.py --workdir=... --config=configs/cifar10_msweep.py:obf,64,local   # offline: tiny model on digits

All runs share the learning rate (3e-4 after warmup, "without decay": lr_max = lr_min), the
weight decay and rho, as in Section 6.1. OBF uses lambda = 1/3 (Section 6.1; Table C.1's
extracted row reads "0.2 1/3 0" for rho / lambda / gamma); "obf_gamma0" is OBF with gamma = 0
(alpha = 0 whatever lambda is; lambda is kept at 1/3). The "obf" row's gamma is not readable in
our copy of the table (the "0" there belongs to the gamma = 0 setting); gamma = 1, the paper's ViT
choice, is used.

The authors have not released the pool's scripts, so every value is the paper's; the settings the
authors' train.py applies to every run (Inception crop minimum area 0.05, OBF with sigmoid
predictions, sharpness on train[:8192]) are used, and outputs are collected every 25 epochs
("every 25th epoch", Section 6.1): 2441 steps = 24.998 epochs of 50 000 at batch 512.
`python launch/forgetting_pool.py --config=configs/cifar10_msweep.py --root=...` runs the pool.

Local variant: the tiny run has a global batch of 16, so m is kept only if it divides 16 (1, 2, 4,
8, 16); any larger m becomes 4 (make_local's default).
"""

from configs import common

# Table C.1 (ViT-S/32, CIFAR FORGET VS. ACC): rho 0.2 constant in every row.
#   PERTURB        rho      OBF lambda, gamma
PERTURBATIONS = {
  "steep": {"sam.perturbation": "steepest", "sam.rho_max": 0.2, "sam.rho_min": None},
  "obf": {
    "sam.perturbation": "obf",
    "sam.rho_max": 0.2,
    "sam.rho_min": None,
    "sam.obf_lambda": 1 / 3,
    "sam.obf_gamma": 1.0,
  },
  "obf_gamma0": {
    "sam.perturbation": "obf",
    "sam.rho_max": 0.2,
    "sam.rho_min": None,
    "sam.obf_lambda": 1 / 3,
    "sam.obf_gamma": 0.0,
  },
}
M_VALUES = tuple(2**k for k in range(10))  # 1 .. 512
SEEDS = (0,)  # one run per (perturbation, m): Section 6.1 names one model per m, no seeds
LOCAL_BATCH = 16  # common.make_local's global batch
COLLECT_EVERY_STEPS = 25 * 50_000 // 512  # every 25th epoch (Section 6.1), rounded down


ARGS = (
  f"PERTURBATION,M[,local] with PERTURBATION in {', '.join(PERTURBATIONS)}, M in "
  f"{', '.join(map(str, M_VALUES))} (default obf,64)"
)


def _parse(arg):
  parts = [p for p in (arg or "obf,64").split(",") if p]
  local = "local" in parts
  rest = [p for p in parts if p != "local"]
  if len(rest) != 2:
    raise ValueError(f"expected {ARGS}, got {arg!r}")
  perturbation, m = rest
  try:
    m = int(m)
  except ValueError:
    raise ValueError(f"m must be an integer in {M_VALUES}, got {m!r}") from None
  if m not in M_VALUES:
    raise ValueError(f"m must be one of {M_VALUES} (2^k, k = 0..9), got {m}")
  return perturbation, m, local


def get_config(arg=None):
  perturbation, m, local = _parse(arg)
  c = common.base_config()
  c.dataset = "cifar10"
  c.eval_datasets = ("cifar10",)
  c.image_size = 224
  c.model = "vit_s32"
  c.head_bias_init = -10.0
  c.loss = "sigmoid_xent"  # Table C.1: BCE
  c.global_batch_size = 512
  c.num_epochs = 300.0
  c.warmup_epochs = 32.0
  c.optimizer = "adamw"
  c.lr_max = 3e-4
  c.lr_min = 3e-4  # Section 6.1: "without decay"
  c.weight_decay = 1.2
  c.clip_grad_norm = 1.0
  c.log_every_steps = 50
  c.eval_every_steps = 980  # ~10 epochs of 512 on CIFAR-10's 50k
  c.checkpoint_every_steps = 980
  common.set_method(c, perturbation, PERTURBATIONS)
  c.sam.m = m
  common.authors_pipeline(c)
  c.analysis.collect_every_steps = COLLECT_EVERY_STEPS
  if local:
    common.make_local(c, "vit_ti4", image_size=32)
    c.sam.m = m if LOCAL_BATCH % m == 0 else 4
    c.analysis.collect_every_steps = 10
  return c
