"""The small-scale reproduction of Tables 1 / B.1: every method on digits and spurious digits.

Arg "BENCHMARK,METHOD":
  BENCHMARK  digits    train on digits, evaluate on its test split;
             spurious  train on spurious_digits (a red patch whose position names a class agrees
                       with the label on 90% of the training images), evaluate on its test_id
                       (same correlation), test_ood (the patch names label + 1) and test_ood_all
                       (each test image with each of the 9 wrong patches) splits;
             digits_val, spurious_val   the same, trained on the first 1150 training images and
                       evaluated on the other 288 (the hyperparameter search; no test split).
  METHOD     one row of METHODS (Table B.1's rows).
The searched hyperparameters (lr_max, sam.rho_max, sam.obf_lambda, sam.obf_gamma) are passed as
overrides by launch/reproduce.py, which runs the search, every run, sharpness, table and plots:

  python launch/reproduce.py --root=/tmp/repro

The model, optimizer and schedule are those of configs/default.py (small ViT, sigmoid loss,
AdamW with linear warmup and decay, clipping), trained for 25 epochs so that a run takes well
under a minute on two CPU cores.
"""

from configs import common

BENCHMARKS = {
  "digits": ("digits", ("digits",)),
  "spurious": (
    "spurious_digits",
    ("spurious_digits", "spurious_digits_ood", "spurious_digits_ood_all"),
  ),
  "digits_val": ("digits_val", ("digits_val",)),
  "spurious_val": ("spurious_digits_val", ("spurious_digits_val",)),
}
RHO = 0.1  # every SAM-family radius before the search (the search overrides it)
ASAM_RHO = 1.0  # ASAM's radius is in |theta|-scaled units: larger (Kwon et al. use ~10x SAM's)
OBF = dict(obf_lambda=1 / 10, obf_gamma=1.0)  # lambda = 1/C, gamma = 1 (the paper's defaults)
GSAM_ALPHA = 0.1  # GSAM's xi (not searched)
ASAM = dict(asam="after", asam_eta=0.01)  # as configs/vit_s32_imagenet.py; eta not searched
#   METHOD            fields of that row (sam.* and top-level)
METHODS = {
  "adamw": common.sam_row("none", 0.0),
  "sam_steep": common.sam_row("steepest", RHO),
  "sam_obf": common.sam_row("obf", RHO, **OBF),
  "gsam_steep": common.sam_row("steepest", RHO, gsam_alpha=GSAM_ALPHA),
  "gsam_obf": common.sam_row("obf", RHO, gsam_alpha=GSAM_ALPHA, **OBF),
  "asam_steep": common.sam_row("steepest", ASAM_RHO, **ASAM),
  "asam_obf": common.sam_row("obf", ASAM_RHO, **ASAM, **OBF),
  "random_sam": common.sam_row("random", RHO),
  "label_smoothing": {**common.sam_row("none", 0.0), "label_smoothing": 0.1},
  "shrink_perturb": {**common.sam_row("none", 0.0), "shrink_perturb": 1e-3},
}
# The paired comparisons (label, base method, other method; the difference is other − base) and
# the reference rows: launch/reproduce.py and launch/powered.py tabulate these.
COMPARED = (
  ("SAM: OBF − STEEP", "sam_steep", "sam_obf"),
  ("GSAM: OBF − STEEP", "gsam_steep", "gsam_obf"),
  ("ASAM: OBF − STEEP", "asam_steep", "asam_obf"),
)
REFERENCES = (
  ("label smoothing − AdamW", "adamw", "label_smoothing"),
  ("shrink-and-perturb − AdamW", "adamw", "shrink_perturb"),
)

ARGS = f"BENCHMARK,METHOD with BENCHMARK in {', '.join(BENCHMARKS)}, METHOD in {', '.join(METHODS)}"


def get_config(arg=None):
  parts = [p for p in (arg or "digits,sam_obf").split(",") if p]
  if len(parts) != 2 or parts[0] not in BENCHMARKS:
    raise ValueError(f"reproduce expects {ARGS}, got {arg!r}")
  benchmark, method = parts
  c = common.base_config()
  c.dataset, c.eval_datasets = BENCHMARKS[benchmark]
  c.image_size = 8
  c.crop_area_min = 0.5  # 8x8 digits: mild crops only
  c.model = "vit_digits"
  c.loss = "sigmoid_xent"
  c.head_bias_init = -2.3  # ~ log(1/9): sigmoid outputs start near 1/C
  c.global_batch_size = 128
  c.num_epochs = 25.0
  c.warmup_epochs = 2.0
  c.optimizer = "adamw"
  c.lr_max = 3e-3
  c.lr_min = 3e-5
  c.weight_decay = 0.05
  c.clip_grad_norm = 1.0
  c.sam.m = 32
  common.set_method(c, method, METHODS)
  c.log_every_steps = 10
  c.eval_every_steps = 50  # the training curves' test points
  c.checkpoint_every_steps = 10_000  # the last step only (sharpness reads it)
  c.keep_checkpoints = 1
  c.eval_batch_size = 512
  c.analysis.sharpness_examples = 512
  c.analysis.sharpness_iters = 30
  return c
