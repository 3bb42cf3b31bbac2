"""Shared config pieces: the base ConfigDict (every field the trainer reads) and helpers.

Paper configs (Table C.1 of the paper) are short files that start from `base_config()`, set
the row's values, pick a method with `set_method`, and offer a `local` variant that runs offline
on a laptop: `--config=configs/vit_s32_imagenet.py:sam_obf,local` (same method, tiny model, the
embedded digits resized). Each states its valid args in `ARGS` (shown by `main.py --help`).

The meaning and allowed values of every field: pf_jax/config_validation.py (FIELDS), also
printed by `python main.py --help`.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Data (pf_jax/input_pipeline.py). eval_datasets: evaluated on their default eval split.
  c.dataset = "digits"
  c.data_dir = ml_collections.FieldReference(
    None, field_type=str
  )  # None: TFDS_DATA_DIR / ~/tensorflow_datasets
  c.eval_datasets = ("digits",)
  c.image_size = 8
  c.crop_area_min = 0.08
  c.image_normalization = "minus_one_to_one"  # p / 127.5 - 1; "imagenet": ImageNet mean/std
  c.eval_interpolation = "bilinear"  # evaluation resize (training resizes bilinearly)
  c.eval_image_size = -1  # evaluation image side; -1: image_size (a ViT needs image_size)
  c.shuffle_buffer = 50_000
  # Model (pf_jax/models).
  c.model = "vit_digits"
  c.head_bias_init = 0.0
  c.mixed_precision = False  # bfloat16 compute, float32 params and optimizer
  # Loss (pf_jax/losses.py).
  c.loss = "softmax_xent"
  c.label_smoothing = 0.0
  # Schedule: epochs are converted to steps with the training split's size;
  # num_train_steps / warmup_steps > 0 override them.
  c.global_batch_size = 128
  c.grad_accum_steps = 1  # the global batch is split into this many sequential micro-batches
  c.num_epochs = 10.0
  c.warmup_epochs = 1.0
  c.num_train_steps = -1
  c.warmup_steps = -1
  # Base optimizer (pf_jax/optimizers.py); linear warmup then linear decay.
  c.optimizer = "adamw"
  c.lr_max = 1e-3
  c.lr_min = 0.0
  c.weight_decay = 0.0
  c.momentum = 0.9  # sgdw
  c.b1 = 0.9  # adamw
  c.b2 = 0.999
  c.clip_grad_norm = 0.0  # 0: no clipping; applied to the final (SAM) gradient
  c.shrink_perturb = 0.0  # factor f of shrink-and-perturb; 0: off
  # SAM family (pf_jax/sam_family.py).
  c.sam = ml_collections.ConfigDict()
  c.sam.perturbation = "none"
  c.sam.rho_max = 0.0
  c.sam.rho_min = -1.0  # < 0: constant rho = rho_max; else lr-proportional
  c.sam.m = 64  # perturbation batch size
  c.sam.chunk_mode = "auto"
  c.sam.obf_lambda = 0.0
  c.sam.obf_gamma = 1.0
  c.sam.obf_alpha = -1.0  # >= 0: fixed alpha (Table B.2) instead of lambda/gamma
  c.sam.obf_predictions = "sigmoid"  # p in OBF's alpha and target; the authors' OBF: sigmoid
  c.sam.gsam_alpha = 0.0  # GSAM's xi; 0: SAM
  c.sam.gsam_normalized_backup = False
  c.sam.asam = ""  # "": off
  c.sam.asam_eta = 0.0
  # Analysis (pf_jax/analysis): Section 6.1 output collection and sharpness.
  c.analysis = ml_collections.ConfigDict()
  c.analysis.collect_every_steps = 0  # record outputs at theta and theta^p every N steps; 0: off
  c.analysis.predictions = "softmax"  # Section 6.1 bins softmax outputs; "sigmoid": per class
  c.analysis.dataset = ""  # forgetting split's dataset (its eval split); "": eval_datasets[0]
  c.analysis.max_raw_values = (
    1_000_000  # also store raw likelihoods when examples x classes <= this
  )
  c.analysis.sharpness_examples = 2048  # training examples for the Hessian's top eigenvalue
  c.analysis.sharpness_batch_size = 256
  c.analysis.sharpness_iters = 100
  c.analysis.sharpness_tol = 1e-4
  # Finetuning: workdir (or checkpoint directory) of another run; its head is replaced.
  c.init_from = ""
  # Loop (pf_jax/train.py).
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.max_consecutive_nonfinite = 10  # non-finite steps are skipped; this many in a row stop the run
  c.profile = False  # clu profiling hook: trace a few steps to workdir
  c.eval_batch_size = 512
  return c


def authors_pipeline(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Settings every run of the authors' release shares (their train.py / validate.py defaults
  and scripts/compute_hessian_*.sh), for the paper configs."""
  c.crop_area_min = 0.05  # train.py --scale default (0.05, 1.0), big_vision's Inception crop
  # The models' pretrained_cfg: ViT mean = std = 0.5 (= [-1, 1]), ResNet ImageNet mean / std;
  # evaluation resizes with the models' "bicubic" (training: --train-interpolation bilinear).
  c.image_normalization = "imagenet" if c.model.startswith("resnet") else "minus_one_to_one"
  c.eval_interpolation = "bicubic"
  # scripts/validate_rn*.sh: validate.py uses the ResNet cfg's test_input_size 288 (crop 0.875 of
  # a 329 short side); ViTs have no test size.
  c.eval_image_size = 288 if c.model.startswith("resnet") else -1
  c.sam.obf_predictions = "sigmoid"  # train.py builds OutputBiasForget(C, gamma): sigmoid=True
  # compute_hessian_*.sh: validate.py --split "train[:8192]", batch 256, 100 iters, tol 1e-4.
  c.analysis.sharpness_examples = 8192
  c.analysis.sharpness_batch_size = 256
  c.analysis.sharpness_iters = 100
  c.analysis.sharpness_tol = 1e-4
  return c


IMAGENET_EVALS = (
  "imagenet2012",
  "imagenet2012_real",
  "imagenet_v2",
  "imagenet_r",
  "imagenet_sketch",
)


def sam_row(perturbation: str, rho_max: float, rho_min: float = -1.0, **sam_fields) -> dict:
  """One METHODS row: perturbation type, rho (rho_min < 0: constant) and other `sam.*` fields."""
  row = {"sam.perturbation": perturbation, "sam.rho_max": rho_max, "sam.rho_min": rho_min}
  row.update({f"sam.{k}": v for k, v in sam_fields.items()})
  return row


def set_method(
  c: ml_collections.ConfigDict, method: str, methods: dict
) -> ml_collections.ConfigDict:
  """Applies one row of a config's METHODS table: top-level fields and `sam.*` fields."""
  if method not in methods:
    raise ValueError(f"unknown method {method!r}; this config has {sorted(methods)}")
  for key, value in methods[method].items():
    target, name = (c.sam, key[4:]) if key.startswith("sam.") else (c, key)
    if name not in target:
      raise ValueError(f"method {method!r} sets unknown config field {key!r}")
    target[name] = value
  return c


def parse_arg(arg, default_method: str, methods: dict):
  """'method[,local]' -> (method, local)."""
  parts = [p for p in (arg or "").split(",") if p]
  local = "local" in parts
  rest = [p for p in parts if p != "local"]
  if len(rest) > 1:
    raise ValueError(f"expected 'method[,local]' with method in {sorted(methods)}, got {arg!r}")
  return (rest[0] if rest else default_method), local


def make_local(
  c: ml_collections.ConfigDict, model: str, image_size: int = 32
) -> ml_collections.ConfigDict:
  """A tiny variant of the same run (method, loss, optimizer) that needs no download: small
  model, images, batch and steps, on scikit-learn's digits (built offline) resized to the model."""
  c.dataset = "digits"
  c.eval_datasets = ("digits",)
  c.model = model
  c.image_size = image_size
  c.eval_image_size = -1
  c.global_batch_size = 16
  c.eval_batch_size = 16
  c.sam.m = 4
  c.num_train_steps = 20
  c.warmup_steps = 2
  c.log_every_steps = 5
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 10
  c.shuffle_buffer = 1000
  return c
