"""Tests of pf_jax.input_pipeline and the offline `digits` TFDS dataset."""

import collections
import hashlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

import pf_jax.datasets  # noqa: F401  (registers `digits`)
from pf_jax import input_pipeline as ip
from pf_jax import preprocessing

N_TRAIN, N_TEST = 1438, 359


def _sklearn_split(split):
  """The documented split rule, recomputed independently of pf_jax."""
  from sklearn.datasets import load_digits

  data = load_digits()
  perm = np.random.RandomState(0).permutation(1797)
  idx = perm[:N_TRAIN] if split == "train" else perm[N_TRAIN:]
  gray = data.images[idx].astype(np.int64)
  images = np.repeat(((gray * 255 + 8) // 16).astype(np.uint8)[..., None], 3, axis=-1)
  return images, data.target[idx].astype(np.int64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds.builder("digits", data_dir=d)
  assert not builder.is_prepared()
  builder.download_and_prepare()  # Offline.
  return d


def _unit_to_uint8(images):
  """Inverse of the pipeline's p / 127.5 - 1 (exact for unresized pixels)."""
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def _hashes(images_u8, labels):
  return [
    hashlib.sha1(im.tobytes() + bytes([int(lb)])).hexdigest() for im, lb in zip(images_u8, labels)
  ]


# ---------------------------------------------------------------- digits ----


def test_digits_builds_offline(data_dir):
  builder = tfds.builder("digits", data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.version == "1.0.0"
  assert builder.info.splits["train"].num_examples == N_TRAIN
  assert builder.info.splits["test"].num_examples == N_TEST
  assert builder.info.features["label"].num_classes == 10
  for split, n in [("train", N_TRAIN), ("test", N_TEST)]:
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = ex["image"], ex["label"]
    assert images.shape == (n, 8, 8, 3) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert (images[..., 0] == images[..., 1]).all()
    assert (images[..., 0] == images[..., 2]).all()
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == n and counts.min() > 0.07 * n  # ~n/10 each
    ref_images, ref_labels = _sklearn_split(split)
    np.testing.assert_array_equal(images[0], ref_images[0])
    assert labels[0] == ref_labels[0]
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_dataset_info(data_dir):
  assert ip.dataset_info("digits", data_dir=data_dir) == (10, N_TRAIN)


def test_digits_auto_prepared_by_pipeline(tmp_path):
  it = ip.eval_iterator("digits", data_dir=str(tmp_path), image_size=8, local_batch_size=512)
  assert sum(b["mask"].sum() for b in it) == N_TEST


# ----------------------------------------------------------------- train ----


def _take(n, **kw):
  it = ip.train_iterator("digits", **kw)
  return [next(it) for _ in range(n)]


def test_train_shapes_and_seeds(data_dir):
  kw = dict(data_dir=data_dir, image_size=16, local_batch_size=32)
  a = _take(3, seed=0, **kw)
  for b in a:
    assert set(b) == {"image", "label"}
    assert b["image"].shape == (32, 16, 16, 3)
    assert b["image"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["label"].min() >= 0 and b["label"].max() < 10
  same = _take(3, seed=0, **kw)
  other = _take(3, seed=1, **kw)
  for x, y in zip(a, same):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, other))
  assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, other))


@pytest.mark.parametrize("in_memory", [True, False])
def test_train_resume_is_bitwise_identical(data_dir, in_memory):
  # 256 * 5 = 1280 < 1438 < 256 * 6: batch 5 crosses the first epoch
  # boundary and batches 6, 7 lie in epoch 1.
  kw = dict(
    data_dir=data_dir,
    image_size=12,
    local_batch_size=256,
    seed=3,
    in_memory=in_memory,
    shuffle_buffer=2048,
    flip=True,
  )
  full = _take(8, **kw)
  resumed = _take(3, start_step=5, **kw)
  for k, b in enumerate(resumed):
    np.testing.assert_array_equal(b["image"], full[5 + k]["image"])
    np.testing.assert_array_equal(b["label"], full[5 + k]["label"])
  # Epoch 1 is a different order than epoch 0.
  assert not np.array_equal(full[0]["label"], full[6]["label"])


def test_train_epochs_and_processes_partition_the_split(data_dir):
  # crop_area_min=1 and no flip: images pass through unchanged, so examples
  # can be identified by hashing.
  ref_images, ref_labels = _sklearn_split("train")
  ref = collections.Counter(_hashes(ref_images, ref_labels))
  per_process = []
  for p in range(2):
    # Each process owns 719 examples: batch 0 is exactly its epoch 0.
    b0, b1 = _take(
      2,
      data_dir=data_dir,
      image_size=8,
      local_batch_size=719,
      seed=0,
      crop_area_min=1.0,
      flip=False,
      process_index=p,
      process_count=2,
    )
    h0 = _hashes(_unit_to_uint8(b0["image"]), b0["label"])
    h1 = _hashes(_unit_to_uint8(b1["image"]), b1["label"])
    assert collections.Counter(h0) == collections.Counter(h1)  # Next epoch.
    assert h0 != h1  # ... reshuffled.
    per_process.append(collections.Counter(h0))
  assert per_process[0] + per_process[1] == ref  # Disjoint; union = split.
  assert not set(per_process[0]) & set(per_process[1])


def test_train_single_process_epoch_is_a_permutation(data_dir):
  ref_images, ref_labels = _sklearn_split("train")
  (b,) = _take(
    1,
    data_dir=data_dir,
    image_size=8,
    local_batch_size=N_TRAIN,
    seed=5,
    crop_area_min=1.0,
    in_memory=False,
    shuffle_buffer=4096,
  )
  got = collections.Counter(_hashes(_unit_to_uint8(b["image"]), b["label"]))
  assert got == collections.Counter(_hashes(ref_images, ref_labels))


# ------------------------------------------------------------------ eval ----


def test_eval_covers_test_split_once(data_dir):
  _, ref_labels = _sklearn_split("test")
  batches = list(ip.eval_iterator("digits", data_dir=data_dir, image_size=8, local_batch_size=100))
  assert len(batches) == 4
  for b in batches:
    assert set(b) == {"image", "label", "mask"}
    assert b["image"].shape == (100, 8, 8, 3)
    assert b["image"].dtype == np.float32 and b["mask"].dtype == np.float32
    assert b["label"].dtype == np.int32
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  assert mask.sum() == N_TEST
  np.testing.assert_array_equal(mask, np.arange(400) < N_TEST)
  np.testing.assert_array_equal(labels[:N_TEST], ref_labels)
  assert (images[N_TEST:] == 0).all() and (labels[N_TEST:] == 0).all()

  # Two processes: same number of batches, contiguous halves 180 + 179.
  per_proc = [
    list(
      ip.eval_iterator(
        "digits",
        data_dir=data_dir,
        image_size=16,
        local_batch_size=64,
        process_index=p,
        process_count=2,
      )
    )
    for p in range(2)
  ]
  assert len(per_proc[0]) == len(per_proc[1]) == 3
  got = []
  for batches in per_proc:
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    got.append(np.concatenate([b["label"] for b in batches])[mask])
  assert [len(g) for g in got] == [180, 179]
  np.testing.assert_array_equal(np.concatenate(got), ref_labels)


# ------------------------------------------------------ other datasets ------


def test_cifar10_and_imagenet_with_mock_data(tmp_path):
  d = str(tmp_path)
  with tfds.testing.mock_data(num_examples=6):
    for name, size in [("cifar10", 32), ("cifar10", 64), ("imagenet2012", 224)]:
      b = next(ip.train_iterator(name, data_dir=d, image_size=size, local_batch_size=4, seed=0))
      assert b["image"].shape == (4, size, size, 3)
      assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
      assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
      batches = list(ip.eval_iterator(name, data_dir=d, image_size=size, local_batch_size=4))
      assert len(batches) == 2
      assert batches[0]["image"].shape == (4, size, size, 3)
      assert sum(x["mask"].sum() for x in batches) == 6

    (b,) = ip.eval_iterator("imagenet2012_real", data_dir=d, image_size=32, local_batch_size=8)
    assert b["real_label"].shape == (8, 1000)
    assert b["real_valid"].shape == (8,)
    np.testing.assert_array_equal(b["real_valid"][6:], 0.0)  # Padding.
    assert set(np.unique(b["real_label"])) <= {0.0, 1.0}
    np.testing.assert_array_equal(b["real_label"].sum(1) > 0, b["real_valid"] > 0)


def test_imagenet_r_classes_are_the_published_wordnet_ids():
  """The index table names, in TFDS's ImageNet-1k label order, the published ImageNet-R classes
  (github.com/hendrycks/imagenet-r: first, last and a few between)."""
  idx = ip.DATASETS["imagenet_r"].logit_subset
  assert len(idx) == 200 and list(idx) == sorted(set(idx)) and 0 <= idx[0] and idx[-1] < 1000
  names = tfds.builder_cls("imagenet2012")(data_dir="/nonexistent").info.features["label"].names
  wnids = [names[i] for i in idx]
  assert wnids[:3] == ["n01443537", "n01484850", "n01494475"] and wnids[-1] == "n12267677"
  assert [wnids[i] for i in (50, 99, 150, 198)] == [
    "n02098286",
    "n02423022",
    "n03710193",
    "n10565667",
  ]
  np.testing.assert_array_equal(ip.class_subset("imagenet_r"), idx)
  assert ip.class_subset("imagenet2012") is None
  assert ip.DATASETS["imagenet_r"].num_classes == 200


def test_missing_dataset_raises_helpful_error(tmp_path):
  d = str(tmp_path)
  with pytest.raises(ip.DatasetNotPreparedError, match="tfds build cifar10"):
    ip.train_iterator("cifar10", data_dir=d, image_size=32, local_batch_size=8, seed=0)
  with pytest.raises(ip.DatasetNotPreparedError, match="ILSVRC2012_img_train.tar"):
    ip.eval_iterator("imagenet2012", data_dir=d, image_size=224, local_batch_size=8)
  with pytest.raises(ValueError, match="Unknown dataset"):
    ip.dataset_info("mnist", data_dir=d)


def test_prefetch_to_device(data_dir):
  import jax
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  batches = list(ip.eval_iterator("digits", data_dir=data_dir, image_size=8, local_batch_size=128))
  out = list(ip.prefetch_to_device(iter(batches), 2, sharding))
  assert len(out) == len(batches)
  for x, y in zip(out, batches):
    assert isinstance(x["image"], jax.Array)
    assert x["image"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(x["image"]), y["image"])
    np.testing.assert_array_equal(np.asarray(x["mask"]), y["mask"])
  plain = list(ip.prefetch_to_device(iter(batches), 3))
  np.testing.assert_array_equal(np.asarray(plain[-1]["label"]), batches[-1]["label"])


def _crafted(h, w):
  """uint8 image whose every pixel is distinct: 3 * (10 y + x) + c."""
  y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
  return (3 * (10 * y + x) + c).astype(np.uint8)


def test_eval_image_is_the_central_crop_of_the_resized_image():
  """image_size 7 at crop fraction 0.875: the short side is resized to round(7 / 0.875) = 8 (an
  8x12 image stays as it is), then the central 7x7 crop: rows 0..6, columns (12 - 7) // 2 = 2..8,
  each pixel p -> p / 127.5 - 1."""
  import tensorflow as tf

  image = _crafted(8, 12)
  got = preprocessing.eval_image(tf.constant(image), 7).numpy()
  np.testing.assert_allclose(got, image[0:7, 2:9] / 127.5 - 1.0, atol=1e-6)
  # A portrait image: the crop is centred vertically instead, rows (12 - 7) // 2 = 2..8.
  tall = _crafted(12, 8)
  got = preprocessing.eval_image(tf.constant(tall), 7).numpy()
  np.testing.assert_allclose(got, tall[2:9, 0:7] / 127.5 - 1.0, atol=1e-6)


def test_train_image_is_the_image_or_its_mirror():
  """With crop_area_min = 1 the Inception crop of a square image is the whole image, resizing to
  its own size is the identity: each training image is the image or its left-right mirror, both
  appear, and the same seed gives the same image."""
  import tensorflow as tf

  image = _crafted(6, 6)
  want = image / 127.5 - 1.0
  key = preprocessing.root_key(0, 0, 0)
  kinds = []
  for i in range(16):
    seed = preprocessing.fold(key, i)
    got = preprocessing.train_image(
      tf.constant(image), seed, encoded=False, image_size=6, crop_area_min=1.0, flip=True
    ).numpy()
    if np.allclose(got, want, atol=1e-6):
      kinds.append("same")
    else:
      np.testing.assert_allclose(got, want[:, ::-1], atol=1e-6)
      kinds.append("mirror")
    again = preprocessing.train_image(
      tf.constant(image), seed, encoded=False, image_size=6, crop_area_min=1.0, flip=True
    ).numpy()
    np.testing.assert_array_equal(got, again)
  assert set(kinds) == {"same", "mirror"}


def test_train_crop_is_a_random_sub_box_of_the_image_resized():
  """crop_area_min 0.25 on a 32x32 ramp (image row in channel 0, column in channel 1), no flip:
  each output row reads one image row and each output column one image column (channel 0 is
  constant along output rows, channel 1 along columns), both increase, the box read lies inside
  the image with about >= 0.25 of its area and an aspect ratio near [3/4, 4/3] (the Inception
  crop; the antialiased resize blurs the box's edges by about a pixel), and seeds read different
  boxes, some well inside the image."""
  import tensorflow as tf

  n, size = 32, 8
  r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  image = np.stack([7 * r, 7 * c, np.zeros_like(r)], -1).astype(np.uint8)
  key = preprocessing.root_key(0, 0, 0)
  boxes = set()
  for i in range(16):
    got = preprocessing.train_image(
      tf.constant(image),
      preprocessing.fold(key, i),
      encoded=False,
      image_size=size,
      crop_area_min=0.25,
      flip=False,
    ).numpy()
    rows, cols = (got[..., 0] + 1.0) * 127.5 / 7, (got[..., 1] + 1.0) * 127.5 / 7
    np.testing.assert_allclose(rows, np.repeat(rows[:, :1], size, 1), atol=1e-3)
    np.testing.assert_allclose(cols, np.repeat(cols[:1, :], size, 0), atol=1e-3)
    rr, cc = rows[:, 0], cols[0, :]
    assert np.all(np.diff(rr) > 0) and np.all(np.diff(cc) > 0), (rr, cc)
    assert rr[0] >= -1e-3 and cc[0] >= -1e-3 and rr[-1] <= n - 1 + 1e-3 and cc[-1] <= n - 1 + 1e-3
    # The box's height and width from its first and last sample centres, +- the blur.
    h, w = (rr[-1] - rr[0]) * size / (size - 1), (cc[-1] - cc[0]) * size / (size - 1)
    assert (h + 2) * (w + 2) >= 0.25 * n * n, (h, w)
    assert 0.75 * (w - 2) <= h + 2 and h - 2 <= 4 / 3 * (w + 2), (h, w)
    boxes.add((round(float(rr[0]), 1), round(float(cc[0]), 1), round(float(h)), round(float(w))))
  assert len(boxes) > 8
  assert any(h * w < 0.6 * n * n for _, _, h, w in boxes)


@pytest.mark.parametrize("normalization", ["minus_one_to_one", "imagenet"])
def test_normalization_by_hand(normalization):
  pixels = np.array([[[0, 128, 255], [10, 20, 30]]], np.uint8)  # [1, 2, 3]
  got = preprocessing.normalize(pixels, normalization).numpy()
  if normalization == "minus_one_to_one":
    want = pixels / 127.5 - 1.0
  else:  # (p / 255 - mean) / std with ImageNet's statistics, by channel
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = (pixels / 255.0 - mean) / std
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_eval_interpolation_is_the_resize_method():
  # A 4x4 checkerboard evaluated at 7x7 (resize to 8, crop 7): the two kernels weigh the
  # neighbours differently, so the pixel values differ; both stay in [-1, 1] (clipped, as PIL).
  board = (np.indices((4, 4)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
  bilinear = preprocessing.eval_image(board, 7, interpolation="bilinear").numpy()
  bicubic = preprocessing.eval_image(board, 7, interpolation="bicubic").numpy()
  assert bilinear.shape == bicubic.shape == (7, 7, 3)
  assert np.abs(bilinear).max() <= 1.0 and np.abs(bicubic).max() <= 1.0
  assert not np.allclose(bilinear, bicubic, atol=1e-3)
