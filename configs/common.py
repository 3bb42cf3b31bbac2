"""Shared config pieces: the base ConfigDict (every field the trainer reads) and helpers.

Paper configs (Table C.1 of the paper) are short files that start from `base_config()`, set
the row's values, pick a method with `set_method`, and offer a `local` variant that runs offline
on a laptop: `--config=configs/vit_s32_imagenet.py:sam_obf,local` (same method, tiny model, the
embedded digits resized). Each states its valid args in `ARGS` (shown by `main.py --help`).

Every field's default, meaning and allowed values are declared once, in
pf_jax/config_fields.py (FIELDS), and printed by `python main.py --help`.
"""

import ml_collections

from pf_jax import config_fields


def base_config() -> ml_collections.ConfigDict:
  """Every field at its declared default (`pf_jax.config_fields.FIELDS`)."""
  return config_fields.defaults()


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
  c.eval_image_size = 288 if c.model.startswith("resnet") else None
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


def sam_row(perturbation: str, rho_max: float, rho_min: float | None = None, **sam_fields) -> dict:
  """One METHODS row: perturbation type, rho (rho_min None: constant) and other `sam.*` fields."""
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
  c.eval_image_size = None
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
