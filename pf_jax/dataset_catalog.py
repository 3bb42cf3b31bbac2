"""The datasets pf_jax knows: names, splits, class counts (no TensorFlow import).

Kept apart from `input_pipeline` so that config validation and `main.py --help` can name
the datasets without starting TensorFlow.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset.

  Attributes:
    tfds_name: TFDS builder name.
    train_split: default training split (None: evaluation-only dataset).
    eval_splits: evaluation split(s); the first one is the default.
    num_classes: size of the label space of the batches (imagenet_r: 200,
      labels are positions in `imagenet_r_class_indices()`).
    image_key / label_key: TFDS feature names.
    real_label_key: multi-label feature (ImageNet-ReaL) or None.
    in_memory: training decodes the split once and keeps it in RAM (small,
      fixed-size images) instead of streaming it.
    auto_prepare: prepared automatically (offline) when missing.
    flip: default of `train_iterator(flip=None)` (digits are never flipped).
    train_examples: size of the training split as published (0: eval-only);
      config validation counts steps with it before any data is read.
  """

  tfds_name: str
  train_split: str | None
  eval_splits: tuple[str, ...]
  num_classes: int
  image_key: str = "image"
  label_key: str = "label"
  real_label_key: str | None = None
  in_memory: bool = False
  auto_prepare: bool = False
  flip: bool = True
  train_examples: int = 0


DATASETS: dict[str, DatasetSpec] = {
  "imagenet2012": DatasetSpec(
    "imagenet2012", "train", ("validation",), 1000, train_examples=1_281_167
  ),
  # ImageNet val with ReaL labels; `label` is the original label.
  "imagenet2012_real": DatasetSpec(
    "imagenet2012_real",
    None,
    ("validation",),
    1000,
    label_key="original_label",
    real_label_key="real_label",
  ),
  "imagenet_v2": DatasetSpec("imagenet_v2", None, ("test",), 1000),
  "imagenet_r": DatasetSpec("imagenet_r", None, ("test",), 200),
  "imagenet_sketch": DatasetSpec("imagenet_sketch", None, ("test",), 1000),
  "cifar10": DatasetSpec("cifar10", "train", ("test",), 10, in_memory=True, train_examples=50_000),
  "cifar100": DatasetSpec(
    "cifar100", "train", ("test",), 100, in_memory=True, train_examples=50_000
  ),
  "digits": DatasetSpec(
    "digits",
    "train",
    ("test",),
    10,
    in_memory=True,
    auto_prepare=True,
    flip=False,
    train_examples=1438,
  ),
}


# Validation carve-outs (`NAME_val`): the first DIGITS_FIT examples of the training split train,
# the rest are its evaluation split, so hyperparameter searches never read a test split (TFDS
# split slicing with absolute indices: exact and independent of rounding).
DIGITS_TRAIN = 1438
DIGITS_FIT = 1150  # ~80%; validation: the last 288 training examples


def validation_carve_out(spec: DatasetSpec) -> DatasetSpec:
  """`spec` training on its first DIGITS_FIT training examples, evaluated on the others."""
  return dataclasses.replace(
    spec,
    train_split=f"{spec.train_split}[:{DIGITS_FIT}]",
    eval_splits=(f"{spec.train_split}[{DIGITS_FIT}:]",),
    train_examples=DIGITS_FIT,
  )


# Builder configs of `spurious_digits` (pf_jax/datasets/spurious_digits.py, CUE_SPECS). Config
# CFG gives `spurious_digits_CFG` (train; eval on test_id, the training correlation),
# `spurious_digits_CFG_ood` (test_ood only) and `spurious_digits_CFG_val`; "patch" is also
# plain `spurious_digits`, `spurious_digits_ood` and `spurious_digits_val`.
SPURIOUS_DIGITS_CONFIGS = ("patch", "tint", "patch_random", "patch16")


def _add_spurious(name: str, config: str) -> None:
  tfds_name = f"spurious_digits/{config}"
  common = dict(in_memory=True, auto_prepare=True, flip=False)
  DATASETS[name] = DatasetSpec(
    tfds_name, "train", ("test_id",), 10, train_examples=DIGITS_TRAIN, **common
  )
  DATASETS[f"{name}_ood"] = DatasetSpec(tfds_name, None, ("test_ood",), 10, **common)
  DATASETS[f"{name}_val"] = validation_carve_out(DATASETS[name])


DATASETS["digits_val"] = validation_carve_out(DATASETS["digits"])
for _config in SPURIOUS_DIGITS_CONFIGS:
  _add_spurious(f"spurious_digits_{_config}", _config)
_add_spurious("spurious_digits", "patch")


def training_datasets() -> tuple[str, ...]:
  """Names of the datasets that have a training split, sorted."""
  return tuple(sorted(k for k, v in DATASETS.items() if v.train_split is not None))
