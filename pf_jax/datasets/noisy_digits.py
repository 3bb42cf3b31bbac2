"""`noisy_digits`: the `digits` images with symmetric label noise on the training labels.

Why: SAM's clearest published gain is robustness to label noise (Foret et al. 2021, Table 4:
CIFAR-10 with 20-80% of the training labels randomized). This builder makes that setting on
scikit-learn's 8x8 digits, offline, so "does SAM do anything here?" can be asked where it is
known to matter (REPORT.md, section 0).

Same images and deterministic train/test split as `digits`. Builder config `symNN` (NN in
NOISE_PERCENTS): exactly round(NN/100 * 1438) training examples, chosen with
numpy.random.RandomState(NOISE_SEED).permutation(1438)[:k], get a label drawn uniformly from the
9 *other* classes (same RandomState, drawn after the permutation); every other training label
and every test label is the true digit. So a fraction NN/100 of the training labels is wrong
(and the true class stays the most frequent label of every digit for NN < 90). Features: image
uint8 (8, 8, 3), label ClassLabel(10) (noisy in train, clean in test), clean_label int64.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pf_jax.datasets import digits

NUM_CLASSES = 10
NOISE_PERCENTS = (25, 50)
NOISE_SEED = 29  # fixed: every run of a config sees the same corrupted labels


def noisy_labels(labels: np.ndarray, fraction: float, seed: int = NOISE_SEED) -> np.ndarray:
  """`labels` with exactly round(fraction * n) of them replaced by a uniformly drawn wrong class."""
  labels = np.asarray(labels, np.int64)
  if not 0 <= fraction <= 1:
    raise ValueError(f"noise fraction must lie in [0, 1], got {fraction}")
  rng = np.random.RandomState(seed)
  k = int(round(fraction * len(labels)))
  flip = rng.permutation(len(labels))[:k]
  shift = rng.randint(1, NUM_CLASSES, size=k)  # 1..9: never the true class
  out = labels.copy()
  out[flip] = (labels[flip] + shift) % NUM_CLASSES
  return out


def load_split_arrays(split: str, percent: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images uint8 [n, 8, 8, 3], labels int64 [n], clean labels int64 [n]) of a split."""
  images, clean = digits.load_split_arrays(split)
  labels = noisy_labels(clean, percent / 100) if split == "train" else clean
  return images, labels, clean


class NoisyDigitsConfig(tfds.core.BuilderConfig):
  """A builder config carrying one noise percentage."""

  def __init__(self, *, percent: int):
    super().__init__(name=f"sym{percent}", description=f"{percent}% symmetric label noise")
    self.percent = percent


class NoisyDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn 8x8 digits with symmetric training-label noise, prepared offline."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [NoisyDigitsConfig(percent=p) for p in NOISE_PERCENTS]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # see digits.Digits.code_path
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(8, 8, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          "clean_label": np.int64,
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
      license="CC BY 4.0 (UCI ML repository)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline.
    return {s: self._generate_examples(split=s) for s in ("train", "test")}

  def _generate_examples(self, split):
    images, labels, clean = load_split_arrays(split, self.builder_config.percent)
    for k in range(len(labels)):
      yield k, {"image": images[k], "label": int(labels[k]), "clean_label": int(clean[k])}
