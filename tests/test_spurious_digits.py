"""The spurious-digits benchmark's construction, read back from the stored pixels.

The cue class of each image is recovered here from its pixels alone (the red cell's position, or
the hue of the tint), with this file's own tables, never from the builder's `cue` feature.
"""

import colorsys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import pf_jax.datasets  # noqa: F401  (registers the builders)
from pf_jax import dataset_catalog
from pf_jax import input_pipeline as ip
from pf_jax.datasets import spurious_digits as sd

# Class c's patch cell (row, col) on the 8x8 grid: border cell 3c clockwise from the top left.
CELLS = [(0, 0), (0, 3), (0, 6), (2, 7), (5, 7), (7, 6), (7, 3), (7, 0), (4, 0), (1, 0)]
N = {"train": 1438, "test_id": 359, "test_ood": 359}


def sklearn_digits(split):
  """Gray uint8 [n, 8, 8] of the digits split, computed from scikit-learn here."""
  from sklearn.datasets import load_digits

  data = load_digits()
  perm = np.random.RandomState(0).permutation(1797)
  idx = perm[:1438] if split == "train" else perm[1438:]
  v = np.rint(data.images[idx]).astype(np.int64)
  return ((v * 255 + 8) // 16).astype(np.uint8), data.target[idx]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def stored(config, split, data_dir):
  builder = tfds.builder(f"spurious_digits/{config}", data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  ds = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  return ds["image"], ds["label"]


def patch_cue(image, cell, strength):
  """Class named by the red cell (-1: no non-gray pixel); checks the cell is one exact square."""
  nongray = (image[..., 0] != image[..., 1]) | (image[..., 0] != image[..., 2])
  if not nongray.any():
    return -1
  rows, cols = np.nonzero(nongray)
  r, c = rows.min() // cell, cols.min() // cell
  block = image[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell]
  assert np.all(block == [round(255 * strength), 0, 0])
  # Every non-gray pixel lies in that one cell (a gray digit pixel under it is overwritten).
  assert rows.max() < (r + 1) * cell and cols.max() < (c + 1) * cell
  return CELLS.index((r, c))


def tint_cue(image):
  """Class whose hue c/10 is nearest the hue of the image's summed colour (-1: gray)."""
  total = image.reshape(-1, 3).astype(np.float64).sum(0)
  if np.ptp(total) == 0:
    return -1
  h, _, _ = colorsys.rgb_to_hsv(*(total / total.max()))
  return int(round(h * 10)) % 10


def within(rate, p, n, sigmas=4.0):
  return abs(rate - p) <= sigmas * np.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12


@pytest.mark.parametrize("config", ["patch", "tint", "patch_random", "patch16"])
def test_cue_agreement_matches_config(config, data_dir):
  spec = sd.CUE_SPECS[config]
  cell = spec.resolution // 8
  for split in ("train", "test_id", "test_ood"):
    images, labels = stored(config, split, data_dir)
    assert images.shape == (N[split], spec.resolution, spec.resolution, 3)
    gray, want_labels = sklearn_digits("train" if split == "train" else "test")
    np.testing.assert_array_equal(labels, want_labels)
    if spec.cue == "patch":
      cues = np.array([patch_cue(im, cell, spec.strength) for im in images])
      # Outside the patch cell the image is the digit, gray and nearest-upsampled.
      up = gray.repeat(cell, 1).repeat(cell, 2)
      for im, g, c in zip(images, up, cues):
        keep = np.ones(g.shape, bool)
        r, col = CELLS[c]
        keep[r * cell : (r + 1) * cell, col * cell : (col + 1) * cell] = False
        np.testing.assert_array_equal(im[keep], np.repeat(g[keep][:, None], 3, 1))
    else:
      cues = np.array([tint_cue(im) for im in images])
      # The tint only rescales each channel of a gray pixel: black stays black.
      assert np.all(images[gray == 0] == 0)
    assert np.all(cues >= 0), "every image of every split carries a cue in this config"
    agree = np.mean(cues == labels)
    if split != "test_ood":
      assert within(agree, spec.correlation, N[split]), (split, agree)
      wrong = cues[cues != labels]
      # Disagreeing cues are spread over the wrong classes (no class takes them all).
      assert len(np.unique(wrong)) == 10 or len(wrong) < 30
    elif spec.ood == "shifted":
      np.testing.assert_array_equal(cues, (labels + 1) % 10)
    else:
      assert spec.ood == "random"
      assert within(agree, 0.1, N[split]), agree


@pytest.mark.parametrize("config", ["patch", "tint"])
def test_ood_all_is_each_test_image_with_each_wrong_cue(config, data_dir):
  """test_ood_all: 359 x 9 examples; test image k with cue (label + j) mod 10 at 9k + j - 1."""
  spec = sd.CUE_SPECS[config]
  images, labels = stored(config, "test_ood_all", data_dir)
  gray, want = sklearn_digits("test")
  assert images.shape == (359 * 9, 8, 8, 3)
  np.testing.assert_array_equal(labels, want.repeat(9))
  read = patch_cue if spec.cue == "patch" else (lambda im, cell, strength: tint_cue(im))
  cues = np.array([read(im, 1, spec.strength) for im in images]).reshape(359, 9)
  for k in range(359):
    # Each of the 9 wrong classes exactly once, in order, on the same digit.
    assert list(cues[k]) == [(want[k] + j) % 10 for j in range(1, 10)], k
    for j in range(9):
      im = images[9 * k + j]
      if spec.cue == "patch":
        r, c = CELLS[cues[k, j]]
        keep = np.ones((8, 8), bool)
        keep[r, c] = False
        np.testing.assert_array_equal(im[..., 1][keep], gray[k][keep])
      else:
        assert np.all(im[gray[k] == 0] == 0) and np.all(im[gray[k] > 0].max(-1) > 0)
  # Its first example of every nine is the "shifted" test_ood, pixel for pixel.
  if spec.ood == "shifted":
    ood, _ = stored(config, "test_ood", data_dir)
    np.testing.assert_array_equal(images[::9], ood)


def test_ood_absent_and_other_settings_from_arrays():
  """Settings without a builder config: the cue is gone only where the config says."""
  spec = sd.CueSpec("tint", correlation=0.5, strength=0.3, resolution=8, ood="absent")
  images, labels, _ = sd.load_split_arrays("test_ood", spec)
  assert np.all(images[..., 0] == images[..., 1]) and np.all(images[..., 0] == images[..., 2])
  images, labels, _ = sd.load_split_arrays("train", spec)
  cues = np.array([tint_cue(im) for im in images])
  assert np.all(cues >= 0)
  assert within(np.mean(cues == labels), 0.5, len(labels))
  spec = sd.CueSpec("patch", correlation=0.0, strength=0.5, resolution=8, ood="random")
  images, labels, _ = sd.load_split_arrays("test_id", spec)
  cues = np.array([patch_cue(im, 1, 0.5) for im in images])
  assert np.all(cues >= 0) and not np.any(cues == labels)


def test_catalog_names_every_builder_config():
  assert dataset_catalog.SPURIOUS_DIGITS_CONFIGS == tuple(sd.CUE_SPECS)
  for cfg in sd.CUE_SPECS:
    assert dataset_catalog.DATASETS[f"spurious_digits_{cfg}"].eval_splits == ("test_id",)
    assert dataset_catalog.DATASETS[f"spurious_digits_{cfg}_ood"].eval_splits == ("test_ood",)
    all_splits = dataset_catalog.DATASETS[f"spurious_digits_{cfg}_ood_all"].eval_splits
    assert all_splits == ("test_ood_all",)
  with pytest.raises(ValueError):
    sd.CueSpec(resolution=12)


def test_validation_carve_out_is_the_tail_of_train(data_dir):
  """digits_val trains on the first 1150 training images and validates on the other 288."""
  spec = ip.DATASETS["digits_val"]
  assert ip.dataset_info("digits_val", data_dir=data_dir) == (10, 1150)
  assert spec.train_examples == 1150
  val = list(ip.eval_iterator("digits_val", data_dir=data_dir, image_size=8, local_batch_size=288))
  assert len(val) == 1 and val[0]["mask"].sum() == 288
  _, labels = sklearn_digits("train")
  np.testing.assert_array_equal(val[0]["label"], labels[1150:])
  fit = ip.train_dataset(
    "digits_val", data_dir=data_dir, image_size=8, local_batch_size=1150, seed=0
  )
  batch = next(iter(fit.as_numpy_iterator()))
  # One epoch is exactly the first 1150 training examples (in some order).
  np.testing.assert_array_equal(
    np.bincount(batch["label"], minlength=10), np.bincount(labels[:1150], minlength=10)
  )
