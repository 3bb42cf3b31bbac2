"""`digits`: scikit-learn's embedded 8x8 handwritten digits as a TFDS dataset.

The source data ships inside scikit-learn (`sklearn.datasets.load_digits`,
1,797 grayscale 8x8 images with integer values 0..16, 10 classes), so this
builder prepares completely offline: `_split_generators` never touches the
download manager.

Features
  image: uint8 (8, 8, 3). Each gray value v in 0..16 is scaled to 0..255 as
         round(v * 255 / 16) with halves rounded up, i.e. the integer
         (v * 255 + 8) // 16 (so 8 -> 128), and replicated to 3 channels so
         every model in the code base sees RGB input.
  label: ClassLabel(num_classes=10), the digit.

Split rule (deterministic, frozen)
  perm = numpy.random.RandomState(0).permutation(1797)   # legacy RNG, stable
  train = sklearn indices perm[:1438]   (1,438 examples, ~80%)
  test  = sklearn indices perm[1438:]   (  359 examples)
  Within each split the examples are stored in that permutation order (TFDS
  shuffling is disabled), so example k of `train` is sklearn digit perm[k] and
  example k of `test` is sklearn digit perm[1438 + k].

Importing this module (or `pf_jax.datasets`) registers the builder, after which
`tfds.builder('digits', data_dir=...).download_and_prepare()` works offline.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 1797
NUM_TRAIN = 1438
NUM_TEST = NUM_EXAMPLES - NUM_TRAIN  # 359
SPLIT_SEED = 0

_DESCRIPTION = """\
The 8x8 handwritten digits embedded in scikit-learn (a copy of the test set of
the UCI ML "Optical Recognition of Handwritten Digits" data set), 1,797 images
of 10 classes. Gray values 0..16 are scaled to 0..255 (round half up) and
replicated to 3 channels. Deterministic split: with
perm = numpy.random.RandomState(0).permutation(1797), train = perm[:1438] and
test = perm[1438:], stored in that order.
"""


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
  """Maps integer gray values 0..16 to 0..255: (v * 255 + 8) // 16."""
  v = np.asarray(values).astype(np.int64)
  if v.min() < 0 or v.max() > 16:
    raise ValueError("digits gray values must lie in 0..16")
  return ((v * 255 + 8) // 16).astype(np.uint8)


def split_indices() -> dict[str, np.ndarray]:
  """Returns the sklearn indices of each split, in stored order."""
  perm = np.random.RandomState(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {"train": perm[:NUM_TRAIN], "test": perm[NUM_TRAIN:]}


def load_split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 8, 8, 3], labels int64 [n]) of a split, stored order."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  data = load_digits()
  images = np.asarray(data.images)  # float64 [1797, 8, 8], integers 0..16
  labels = np.asarray(data.target).astype(np.int64)
  if images.shape != (NUM_EXAMPLES, 8, 8):
    raise ValueError(f"unexpected sklearn digits shape {images.shape}")
  idx = split_indices()[split]
  gray = scale_to_uint8(np.rint(images[idx]))
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  return rgb, labels[idx]


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn 8x8 digits, prepared offline."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  # TFDS's default `code_path` goes through `importlib_resources` (an optional
  # dependency that may be absent); this file is all TFDS needs (it looks for a
  # sibling `checksums.tsv`, which an offline dataset does not have).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=_DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=("image", "label"),
      # Keep the documented order (example k == perm[k]); no key hashing.
      disable_shuffling=True,
      homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
      license="CC BY 4.0 (UCI ML repository)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline: the data is embedded in scikit-learn.
    return {
      "train": self._generate_examples(split="train"),
      "test": self._generate_examples(split="test"),
    }

  def _generate_examples(self, split):
    images, labels = load_split_arrays(split)
    for k in range(len(labels)):
      yield k, {"image": images[k], "label": int(labels[k])}
