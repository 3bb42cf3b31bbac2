"""Section 6.1's pool of models at laptop scale: the m sweep on the embedded digits data.

Arg "perturbation,m": perturbation in {steep, obf, obf_gamma0} (steepest ascent; OBF with
lambda = 1/3, gamma = 1; OBF with gamma = 0), m = 2^k for k = 0 .. log2(global batch). Every run
shares the learning rate (constant after warmup, as "without decay" in Section 6.1), the weight
decay and rho, and collects outputs at theta and theta^p on the digits test split every
`analysis.collect_every_steps` steps. The whole pool (SEEDS seeds per point), its sharpness,
Figure 2 and the table:

  python launch/forgetting_pool.py --root=/tmp/pool

Section 6.1's settings where they carry over: OBF lambda = 1/3 and the gamma = 0 arm, m from 1 to
the whole batch. Different, for this scale: rho 0.1 (the paper's 0.2 is for ViT-S/32 on CIFAR-10),
batch 64 (m up to 2^6, not 2^9), 30 epochs, outputs every 110 steps on the 359 test images.
"""

from configs import common

GLOBAL_BATCH = 64
M_VALUES = tuple(2**k for k in range(GLOBAL_BATCH.bit_length()))  # 1 .. 64
SEEDS = tuple(range(5))  # runs per (perturbation, m): a rank correlation that can decide
#   PERTURB        rho, OBF lambda (Section 6.1's 1/3), gamma
PERTURBATIONS = {
  "steep": common.sam_row("steepest", 0.1),
  "obf": common.sam_row("obf", 0.1, obf_lambda=1 / 3, obf_gamma=1.0),
  "obf_gamma0": common.sam_row("obf", 0.1, obf_lambda=1 / 3, obf_gamma=0.0),
}

ARGS = (
  f"PERTURBATION,M with PERTURBATION in {', '.join(PERTURBATIONS)}, M in "
  f"{', '.join(map(str, M_VALUES))} (default obf,8)"
)


def _parse(arg):
  parts = [p for p in (arg or "obf,8").split(",") if p]
  if len(parts) != 2 or parts[0] not in PERTURBATIONS:
    raise ValueError(
      f"digits_msweep expects 'perturbation,m' with perturbation in "
      f"{sorted(PERTURBATIONS)}, got {arg!r}"
    )
  try:
    m = int(parts[1])
  except ValueError:
    raise ValueError(f"digits_msweep: m must be one of {M_VALUES}, got {parts[1]!r}") from None
  if m not in M_VALUES:
    raise ValueError(f"digits_msweep: m must be one of {M_VALUES}, got {m}")
  return parts[0], m


def get_config(arg=None):
  perturbation, m = _parse(arg)
  c = common.base_config()
  c.dataset = "digits"
  c.eval_datasets = ("digits",)
  c.image_size = 8
  c.crop_area_min = 0.5
  c.model = "vit_digits"
  c.loss = "sigmoid_xent"
  c.head_bias_init = -2.3  # ~ log(1/9): sigmoid outputs start near 1/C
  c.global_batch_size = GLOBAL_BATCH
  c.num_epochs = 30.0
  c.warmup_epochs = 2.0
  c.optimizer = "adamw"
  c.lr_max = 1e-3
  c.lr_min = 1e-3  # constant after warmup
  c.weight_decay = 0.05
  c.clip_grad_norm = 1.0
  common.set_method(c, perturbation, PERTURBATIONS)
  c.sam.m = m
  c.analysis.collect_every_steps = 110  # ~5 epochs of 1437 training images
  c.analysis.sharpness_examples = 1024
  c.log_every_steps = 110
  c.eval_every_steps = 330
  c.checkpoint_every_steps = 330
  c.eval_batch_size = 128
  return c
