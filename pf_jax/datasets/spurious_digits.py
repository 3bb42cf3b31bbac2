"""`spurious_digits`: the `digits` images with a class cue that is spuriously correlated with the label.

Why: "SAM Enhances Feature Quality via Balanced Learning" finds SAM's edge largest where the
training data carries an easy, redundant or spurious feature. This builder adds such a feature to
scikit-learn's 8x8 digits (same images, same deterministic train/test split as `digits`, built
offline), so the in-distribution (ID) and out-of-distribution (OOD) effect of a perturbation can
be measured on a laptop, like the paper's ImageNet vs ImageNet-R/Sketch columns.

Every image carries a cue naming a class c (the "cue class"):
  * cue "patch": one cell of the 8x8 grid (a `resolution // 8` square) is painted pure red,
    (round(255 * strength), 0, 0); its position encodes c: ring cell 3c of the 28 border cells
    of the 8x8 grid, numbered clockwise from the top-left corner (`PATCH_CELLS`). Digit pixels
    are gray (R = G = B), so the patch is the only non-gray cell.
  * cue "tint": every pixel is tinted towards hue c / 10 (HSV, full saturation and value):
    channel_k = round(gray * (1 - strength + strength * hue_rgb_k)). The background stays black.
Cue class per split, drawn with numpy.random.RandomState(seed of the split):
  * train and test_id: c = label with probability `correlation`, else uniform over the other 9
    classes (so the cue agrees with the label on a `correlation` fraction, in expectation);
  * test_ood, by `ood`: "random" (c uniform over all 10 classes, independent of the label),
    "shifted" (c = (label + 1) mod 10: always a wrong class), "absent" (no cue at all);
  * test_ood_all (every config): each test image 9 times, once with each wrong cue class,
    c = (label + j) mod 10 for j = 1..9 (example 9k + j − 1 is test image k with shift j):
    3,231 OOD examples instead of 359, so test-set sampling noise shrinks (its first example of
    every nine is the "shifted" test_ood).
Images are the digits' gray values scaled to 0..255 as in `digits`, nearest-upsampled from 8x8
to `resolution` x `resolution` before the cue is added. Features: image uint8
(resolution, resolution, 3), label ClassLabel(10), cue int64 (the cue class, -1 when absent).
"""

from __future__ import annotations

import colorsys
import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from pf_jax.datasets import digits

NUM_CLASSES = 10
GRID = 8
# The 28 border cells of the 8x8 grid, clockwise from the top-left corner.
RING = (
  [(0, j) for j in range(GRID)]
  + [(i, GRID - 1) for i in range(1, GRID)]
  + [(GRID - 1, j) for j in range(GRID - 2, -1, -1)]
  + [(i, 0) for i in range(GRID - 2, 0, -1)]
)
PATCH_CELLS = tuple(RING[3 * c] for c in range(NUM_CLASSES))  # (row, col) of class c's patch
SPLIT_SEEDS = {"train": 1, "test_id": 2, "test_ood": 3}
SPLITS = (*SPLIT_SEEDS, "test_ood_all")
OOD_MODES = ("random", "shifted", "absent")


@dataclasses.dataclass(frozen=True)
class CueSpec:
  """One cue setting (a TFDS builder config)."""

  cue: str = "patch"  # "patch" or "tint"
  correlation: float = 0.9  # fraction of train / test_id images whose cue names the label
  strength: float = 1.0  # patch brightness or tint saturation, in (0, 1]
  resolution: int = 8  # image side: a multiple of 8
  ood: str = "shifted"  # test_ood's cue: "random", "shifted" or "absent"

  def __post_init__(self):
    if self.cue not in ("patch", "tint"):
      raise ValueError(f"cue must be 'patch' or 'tint', got {self.cue!r}")
    if not 0.0 <= self.correlation <= 1.0:
      raise ValueError("correlation must lie in [0, 1]")
    if not 0.0 < self.strength <= 1.0:
      raise ValueError("strength must lie in (0, 1]")
    if self.resolution < GRID or self.resolution % GRID:
      raise ValueError("resolution must be a positive multiple of 8")
    if self.ood not in OOD_MODES:
      raise ValueError(f"ood must be one of {OOD_MODES}, got {self.ood!r}")


# The named settings (builder configs). Their names are also listed, TensorFlow-free, in
# pf_jax/dataset_catalog.py (SPURIOUS_DIGITS_CONFIGS); a test keeps the two in step.
CUE_SPECS = {
  "patch": CueSpec("patch", 0.9, 1.0, 8, "shifted"),
  "tint": CueSpec("tint", 0.9, 0.5, 8, "shifted"),
  "patch_random": CueSpec("patch", 0.9, 1.0, 8, "random"),
  "patch16": CueSpec("patch", 0.9, 1.0, 16, "shifted"),
}


def tint_rgb(c: int) -> np.ndarray:
  """RGB (each 0..1) of class c's hue c / 10 at full saturation and value."""
  return np.asarray(colorsys.hsv_to_rgb(c / NUM_CLASSES, 1.0, 1.0), np.float64)


def cue_classes(labels: np.ndarray, split: str, spec: CueSpec) -> np.ndarray:
  """The cue class of every example of `split` (-1: no cue), deterministic."""
  labels = np.asarray(labels, np.int64)
  if split == "test_ood_all":  # labels already repeated 9 times per image (load_split_arrays)
    shifts = np.tile(np.arange(1, NUM_CLASSES), len(labels) // (NUM_CLASSES - 1))
    return (labels + shifts) % NUM_CLASSES
  rng = np.random.RandomState(SPLIT_SEEDS[split])
  n = len(labels)
  if split == "test_ood":
    if spec.ood == "absent":
      return np.full(n, -1, np.int64)
    if spec.ood == "shifted":
      return (labels + 1) % NUM_CLASSES
    return rng.randint(0, NUM_CLASSES, size=n).astype(np.int64)
  agree = rng.random_sample(n) < spec.correlation
  other = (labels + rng.randint(1, NUM_CLASSES, size=n)) % NUM_CLASSES  # uniform over the other 9
  return np.where(agree, labels, other).astype(np.int64)


def add_cue(gray: np.ndarray, cue: int, spec: CueSpec) -> np.ndarray:
  """uint8 [r, r, 3] image of a gray uint8 [r, r] digit carrying `cue` (-1: none)."""
  rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float64)
  if cue >= 0 and spec.cue == "tint":
    rgb = rgb * (1.0 - spec.strength + spec.strength * tint_rgb(cue))
  elif cue >= 0:
    cell = spec.resolution // GRID
    row, col = PATCH_CELLS[cue]
    rgb[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = (255 * spec.strength, 0, 0)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def load_split_arrays(split: str, spec: CueSpec):
  """(images uint8 [n, r, r, 3], labels int64 [n], cues int64 [n]) of a split, stored order."""
  base = "train" if split == "train" else "test"
  images, labels = digits.load_split_arrays(base)
  up = spec.resolution // GRID
  gray = images[..., 0].repeat(up, axis=1).repeat(up, axis=2)
  if split == "test_ood_all":  # each image once per wrong cue class
    gray, labels = gray.repeat(NUM_CLASSES - 1, axis=0), labels.repeat(NUM_CLASSES - 1)
  cues = cue_classes(labels, split, spec)
  out = np.stack([add_cue(g, c, spec) for g, c in zip(gray, cues)])
  return out, labels, cues


class SpuriousDigitsConfig(tfds.core.BuilderConfig):
  """A builder config carrying one `CueSpec`."""

  def __init__(self, *, name: str, spec: CueSpec):
    super().__init__(name=name, description=str(spec))
    self.spec = spec


class SpuriousDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn 8x8 digits with a spurious class cue, prepared offline (module doc)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "test_ood_all: every test image with each of the 9 wrong cues.",
  }
  BUILDER_CONFIGS = [SpuriousDigitsConfig(name=k, spec=v) for k, v in CUE_SPECS.items()]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # see digits.Digits.code_path
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.spec.resolution
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(r, r, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          "cue": np.int64,
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,
      license="CC BY 4.0 (UCI ML repository)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline.
    return {s: self._generate_examples(split=s) for s in SPLITS}

  def _generate_examples(self, split):
    images, labels, cues = load_split_arrays(split, self.builder_config.spec)
    for k in range(len(labels)):
      yield k, {"image": images[k], "label": int(labels[k]), "cue": int(cues[k])}
