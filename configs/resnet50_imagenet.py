"""ResNet-50 trained from scratch on ImageNet (paper Table C.1, rows "ResNet-50, IMAGENET TRAIN").

  python main.py --workdir=... --config=configs/resnet50_imagenet.py:sam_obf
  python main.py --workdir=... --config=configs/resnet50_imagenet.py:sam_obf,local   # offline: tiny model on digits

Methods: see METHODS below (default: sam_obf); the ASAM and baseline rows are Table B.1's.

Every value is the authors' run (BorealisAI/perturbed-forgetting: scripts/train_rn50.sh and the
rn50_* lines of scripts/run_experiments.sh, with train.py's defaults for flags they do not pass);
where our copy of Table C.1 is unreadable or says otherwise, the scripts govern (docs/fidelity.md).
"""

from configs import common

NUM_CLASSES = 1000  # "C" in Table C.1's lambda = 1/C


# run_experiments.sh, rn50_*: rho max, min (min < 0: constant; scripts without
# --rho-policy lr_prop keep rho constant), train_rn50.sh --rho 0.04 --min-rho 0.02 --obf-C 1000.
#   ALGO / PERTURB      rho max, min          OBF lambda, gamma               GSAM xi, norm backup / ASAM
METHODS = {
  "sgd": common.sam_row("none", 0.0),
  "sam_steep": common.sam_row("steepest", 0.04, 0.02),
  "sam_obf": common.sam_row("obf", 0.04, obf_lambda=1 / NUM_CLASSES, obf_gamma=1e-12),
  "gsam_steep": common.sam_row(
    "steepest", 0.04, 0.02, gsam_alpha=0.01, gsam_normalized_backup=True
  ),
  # No --backup-normalized (Table C.1's NORM BACKUP cell reads YES: the script governs).
  "gsam_obf": common.sam_row(
    "obf",
    0.04,
    obf_lambda=1 / NUM_CLASSES,
    obf_gamma=1e-12,
    gsam_alpha=0.01,
    gsam_normalized_backup=False,
  ),
  # ASAM (Table B.1), --asam-before-norm: the perturbation keeps the fixed norm rho (Appendix C);
  # rho 0.8 (ASAM scales the step by |theta|): lr-proportional down to 0.4 for steepest ascent,
  # constant for OBF.
  "asam_steep": common.sam_row("steepest", 0.8, 0.4, asam="before"),
  "asam_obf": common.sam_row(
    "obf", 0.8, obf_lambda=1 / NUM_CLASSES, obf_gamma=1e-12, asam="before"
  ),
  # Baselines of Appendix B (Table B.1): randsam_sgdw, rho 0.04 constant.
  "random": common.sam_row("random", 0.04),
  "shrink_perturb": {**common.sam_row("none", 0.0), "shrink_perturb": 1e-5},
  "label_smooth": {**common.sam_row("none", 0.0), "label_smoothing": 0.1},
}

ARGS = f"METHOD[,local] with METHOD in {', '.join(METHODS)} (default sam_obf)"


def get_config(arg=None, *, model="resnet50", methods=None):
  """`model` / `methods` let sibling rows of Table C.1 (resnet101) reuse this one."""
  methods = METHODS if methods is None else methods
  method, local = common.parse_arg(arg, "sam_obf", methods)
  c = common.base_config()
  c.dataset = "imagenet2012"
  c.eval_datasets = common.IMAGENET_EVALS
  c.image_size = 224
  c.model = model
  c.head_bias_init = 0.0  # no --head-init-bias (Table C.1: 0)
  c.loss = "softmax_xent"  # Table C.1: CE
  c.global_batch_size = 4096
  c.num_epochs = 90.0
  c.warmup_epochs = 16.0
  c.optimizer = "sgdw"  # Table C.1: SGD, momentum 0.9, decoupled weight decay
  c.momentum = 0.9
  c.lr_max = 1.6
  c.lr_min = 0.016
  c.weight_decay = 1e-3
  c.clip_grad_norm = None  # Table C.1: N/A (no clipping)
  c.sam.m = 64  # SHARPNESS_M=64
  common.authors_pipeline(c)  # OBF with sigmoid predictions although the loss is CE
  c.log_every_steps = 100
  c.eval_every_steps = 3130  # ~10 epochs of 4096
  c.checkpoint_every_steps = 1000
  common.set_method(c, method, methods)
  if local:
    common.make_local(c, "resnet_tiny", image_size=32)
  return c
