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
    num_classes: size of the label space of the batches (imagenet_r: 200).
    image_key / label_key: TFDS feature names.
    real_label_key: multi-label feature (ImageNet-ReaL) or None.
    in_memory: training decodes the split once and keeps it in RAM (small,
      fixed-size images) instead of streaming it.
    auto_prepare: prepared automatically (offline) when missing.
    flip: default of `train_iterator(flip=None)` (digits are never flipped).
    train_examples: size of the training split as published (0: eval-only);
      config validation counts steps with it before any data is read.
    logit_subset: the ImageNet-1k logits the dataset's classes are (labels are
      positions in it), or None: all logits, labels as stored.
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
  logit_subset: tuple[int, ...] | None = None


# ImageNet-R's 200 classes (github.com/hendrycks/imagenet-r) as ImageNet-1k label indices (TFDS
# imagenet2012 order: sorted WordNet ids), ascending. TFDS stores ImageNet-R labels as 1k indices;
# the pipeline maps them to positions here (0..199) and the evaluator keeps only these logits.
IMAGENET_R_CLASSES = tuple(
  int(i)
  for i in """
1 2 4 6 8 9 11 13 22 23 26 29 31 39 47 63 71 76 79 84 90 94 96 97 99 100 105 107 113 122 125
130 132 144 145 147 148 150 151 155 160 161 162 163 171 172 178 187 195 199 203 207 208 219
231 232 234 235 242 245 247 250 251 254 259 260 263 265 267 269 276 277 281 288 289 291 292
293 296 299 301 308 309 310 311 314 315 319 323 327 330 334 335 337 338 340 341 344 347 353
355 361 362 365 366 367 368 372 388 390 393 397 401 407 413 414 425 428 430 435 437 441 447
448 457 462 463 469 470 471 472 476 483 487 515 546 555 558 570 579 583 587 593 594 596 609
613 617 621 629 637 657 658 701 717 724 763 768 774 776 779 780 787 805 812 815 820 824 833
847 852 866 875 883 889 895 907 928 931 932 933 934 936 937 943 945 947 948 949 951 953 954
957 963 965 967 980 981 983 988
""".split()
)


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
  "imagenet_r": DatasetSpec("imagenet_r", None, ("test",), 200, logit_subset=IMAGENET_R_CLASSES),
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
# `spurious_digits_CFG_ood` (test_ood only), `spurious_digits_CFG_ood_all` (test_ood_all: each
# test image with each of the 9 wrong cues) and `spurious_digits_CFG_val`; "patch" is also plain
# `spurious_digits`, `spurious_digits_ood`, `spurious_digits_ood_all` and `spurious_digits_val`.
SPURIOUS_DIGITS_CONFIGS = ("patch", "tint", "patch_random", "patch16")


def _add_spurious(name: str, config: str) -> None:
  tfds_name = f"spurious_digits/{config}"
  common = dict(in_memory=True, auto_prepare=True, flip=False)
  DATASETS[name] = DatasetSpec(
    tfds_name, "train", ("test_id",), 10, train_examples=DIGITS_TRAIN, **common
  )
  DATASETS[f"{name}_ood"] = DatasetSpec(tfds_name, None, ("test_ood",), 10, **common)
  DATASETS[f"{name}_ood_all"] = DatasetSpec(tfds_name, None, ("test_ood_all",), 10, **common)
  DATASETS[f"{name}_val"] = validation_carve_out(DATASETS[name])


DATASETS["digits_val"] = validation_carve_out(DATASETS["digits"])
# `noisy_digits_symNN` (pf_jax/datasets/noisy_digits.py): digits with NN% of the training labels
# replaced by a wrong class (test labels clean), and its validation carve-out (noisy labels too).
for _percent in (25, 50):
  DATASETS[f"noisy_digits_sym{_percent}"] = dataclasses.replace(
    DATASETS["digits"], tfds_name=f"noisy_digits/sym{_percent}"
  )
  DATASETS[f"noisy_digits_sym{_percent}_val"] = validation_carve_out(
    DATASETS[f"noisy_digits_sym{_percent}"]
  )
for _config in SPURIOUS_DIGITS_CONFIGS:
  _add_spurious(f"spurious_digits_{_config}", _config)
_add_spurious("spurious_digits", "patch")


def training_datasets() -> tuple[str, ...]:
  """Names of the datasets that have a training split, sorted."""
  return tuple(sorted(k for k, v in DATASETS.items() if v.train_split is not None))


# Image preprocessing choices (pf_jax/preprocessing.py), named here without TensorFlow.
# normalization -> (mean, std) per channel of p / 255; None: p / 127.5 - 1 exactly.
NORMALIZATIONS = {
  "minus_one_to_one": None,  # mean = std = 0.5: timm's "inception" statistics (the authors' ViT)
  "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the authors' ResNet
}
INTERPOLATIONS = ("bilinear", "bicubic")  # evaluation resize
