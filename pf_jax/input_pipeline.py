"""tf.data / TFDS input pipeline of pf_jax (TensorFlow runs on the CPU only).

Datasets: see `DATASETS` (pf_jax/dataset_catalog.py, the one table with splits, class counts and feature
keys). `digits` (pf_jax.datasets.digits) is prepared automatically and offline;
every other dataset must already be prepared in `data_dir` (a clear error says
how otherwise).

Image values: every batch carries `image` float32 [B, H, W, 3] in [-1, 1]
(uint8 pixel p -> p / 127.5 - 1). Labels are int32.

Training stream (`train_iterator`) -- deterministic and step-addressable:
  * The stream is epochs e = 0, 1, 2, ... of this process's examples (its
    `tfds.even_splits(split, process_count)[process_index]` part). Epoch e is
    a permutation of those examples seeded by (seed, process_index, e):
    - in-memory datasets (digits, cifar; decoded once, kept in RAM): an exact
      uniform permutation, `tf.random.experimental.stateless_shuffle`;
    - streamed datasets (ImageNet): the split read in its fixed on-disk order
      through `Dataset.shuffle(shuffle_buffer, seed=f(seed, process_index, e))`.
  * Example number `pos` of epoch e is augmented (crop, flip) with stateless
    ops seeded by (seed, process_index, e, pos): independent of where reading
    started and of parallelism.
  * Resuming at step s starts at epoch s*B // N and skips the s*B % N first
    examples of that epoch before any decoding/augmentation. Batches cross
    epoch boundaries, so batch s of a resumed run is bitwise equal to batch s of
    an uninterrupted run; checkpoints only need the step.
  (Streamed datasets read the skipped records' raw bytes once on resume; do not
  call `tf.random.set_seed` with different values across runs -- tf.data's
  seeded shuffle mixes in TF's global seed.)

Training augmentation: Inception crop (`stateless_sample_distorted_bounding_box`
with area range (crop_area_min, 1) and aspect ratio (3/4, 4/3)), bilinear
(antialiased) resize to image_size x image_size, optional horizontal flip.
Evaluation: resize (aspect-preserving) so the short side is
round(image_size / 0.875), then a central image_size crop; the same math is used
for 8x8 digits and 32x32 CIFAR.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

import pf_jax.datasets  # noqa: F401  (registers the `digits` TFDS builder)
from pf_jax.dataset_catalog import DATASETS  # noqa: F401  (re-exported)
from pf_jax.dataset_catalog import DatasetSpec  # noqa: F401  (re-exported)

# TensorFlow is only the CPU input pipeline: never let it take accelerators.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError) as _e:  # Already initialised / no GPU API.
  logging.warning("input_pipeline: could not hide GPUs from TF: %s", _e)

EVAL_CROP_FRACTION = 0.875
_INF_EPOCHS = 2**62
_RNG_ALG = "philox"  # Fixed algorithm: results never depend on the device.

# The 200 ImageNet classes (WordNet ids, sorted) of ImageNet-R
# (https://github.com/hendrycks/imagenet-r).
IMAGENET_R_WNIDS = (
  "n01443537",
  "n01484850",
  "n01494475",
  "n01498041",
  "n01514859",
  "n01518878",
  "n01531178",
  "n01534433",
  "n01614925",
  "n01616318",
  "n01630670",
  "n01632777",
  "n01644373",
  "n01677366",
  "n01694178",
  "n01748264",
  "n01770393",
  "n01774750",
  "n01784675",
  "n01806143",
  "n01820546",
  "n01833805",
  "n01843383",
  "n01847000",
  "n01855672",
  "n01860187",
  "n01882714",
  "n01910747",
  "n01944390",
  "n01983481",
  "n01986214",
  "n02007558",
  "n02009912",
  "n02051845",
  "n02056570",
  "n02066245",
  "n02071294",
  "n02077923",
  "n02085620",
  "n02086240",
  "n02088094",
  "n02088238",
  "n02088364",
  "n02088466",
  "n02091032",
  "n02091134",
  "n02092339",
  "n02094433",
  "n02096585",
  "n02097298",
  "n02098286",
  "n02099601",
  "n02099712",
  "n02102318",
  "n02106030",
  "n02106166",
  "n02106550",
  "n02106662",
  "n02108089",
  "n02108915",
  "n02109525",
  "n02110185",
  "n02110341",
  "n02110958",
  "n02112018",
  "n02112137",
  "n02113023",
  "n02113624",
  "n02113799",
  "n02114367",
  "n02117135",
  "n02119022",
  "n02123045",
  "n02128385",
  "n02128757",
  "n02129165",
  "n02129604",
  "n02130308",
  "n02134084",
  "n02138441",
  "n02165456",
  "n02190166",
  "n02206856",
  "n02219486",
  "n02226429",
  "n02233338",
  "n02236044",
  "n02268443",
  "n02279972",
  "n02317335",
  "n02325366",
  "n02346627",
  "n02356798",
  "n02363005",
  "n02364673",
  "n02391049",
  "n02395406",
  "n02398521",
  "n02410509",
  "n02423022",
  "n02437616",
  "n02445715",
  "n02447366",
  "n02480495",
  "n02480855",
  "n02481823",
  "n02483362",
  "n02486410",
  "n02510455",
  "n02526121",
  "n02607072",
  "n02655020",
  "n02672831",
  "n02701002",
  "n02749479",
  "n02769748",
  "n02793495",
  "n02797295",
  "n02802426",
  "n02808440",
  "n02814860",
  "n02823750",
  "n02841315",
  "n02843684",
  "n02883205",
  "n02906734",
  "n02909870",
  "n02939185",
  "n02948072",
  "n02950826",
  "n02951358",
  "n02966193",
  "n02980441",
  "n02992529",
  "n03124170",
  "n03272010",
  "n03345487",
  "n03372029",
  "n03424325",
  "n03452741",
  "n03467068",
  "n03481172",
  "n03494278",
  "n03495258",
  "n03498962",
  "n03594945",
  "n03602883",
  "n03630383",
  "n03649909",
  "n03676483",
  "n03710193",
  "n03773504",
  "n03775071",
  "n03888257",
  "n03930630",
  "n03947888",
  "n04086273",
  "n04118538",
  "n04133789",
  "n04141076",
  "n04146614",
  "n04147183",
  "n04192698",
  "n04254680",
  "n04266014",
  "n04275548",
  "n04310018",
  "n04325704",
  "n04347754",
  "n04389033",
  "n04409515",
  "n04465501",
  "n04487394",
  "n04522168",
  "n04536866",
  "n04552348",
  "n04591713",
  "n07614500",
  "n07693725",
  "n07695742",
  "n07697313",
  "n07697537",
  "n07714571",
  "n07714990",
  "n07718472",
  "n07720875",
  "n07734744",
  "n07742313",
  "n07745940",
  "n07749582",
  "n07753275",
  "n07753592",
  "n07768694",
  "n07873807",
  "n07880968",
  "n07920052",
  "n09472597",
  "n09835506",
  "n10565667",
  "n12267677",
)

# Their ImageNet-1k label indices (TFDS imagenet2012 order = sorted wnids).
# Fallback only; `imagenet_r_class_indices()` derives them from TFDS's names.
_IMAGENET_R_CLASS_INDICES_CONST = (
  1,
  2,
  4,
  6,
  8,
  9,
  11,
  13,
  22,
  23,
  26,
  29,
  31,
  39,
  47,
  63,
  71,
  76,
  79,
  84,
  90,
  94,
  96,
  97,
  99,
  100,
  105,
  107,
  113,
  122,
  125,
  130,
  132,
  144,
  145,
  147,
  148,
  150,
  151,
  155,
  160,
  161,
  162,
  163,
  171,
  172,
  178,
  187,
  195,
  199,
  203,
  207,
  208,
  219,
  231,
  232,
  234,
  235,
  242,
  245,
  247,
  250,
  251,
  254,
  259,
  260,
  263,
  265,
  267,
  269,
  276,
  277,
  281,
  288,
  289,
  291,
  292,
  293,
  296,
  299,
  301,
  308,
  309,
  310,
  311,
  314,
  315,
  319,
  323,
  327,
  330,
  334,
  335,
  337,
  338,
  340,
  341,
  344,
  347,
  353,
  355,
  361,
  362,
  365,
  366,
  367,
  368,
  372,
  388,
  390,
  393,
  397,
  401,
  407,
  413,
  414,
  425,
  428,
  430,
  435,
  437,
  441,
  447,
  448,
  457,
  462,
  463,
  469,
  470,
  471,
  472,
  476,
  483,
  487,
  515,
  546,
  555,
  558,
  570,
  579,
  583,
  587,
  593,
  594,
  596,
  609,
  613,
  617,
  621,
  629,
  637,
  657,
  658,
  701,
  717,
  724,
  763,
  768,
  774,
  776,
  779,
  780,
  787,
  805,
  812,
  815,
  820,
  824,
  833,
  847,
  852,
  866,
  875,
  883,
  889,
  895,
  907,
  928,
  931,
  932,
  933,
  934,
  936,
  937,
  943,
  945,
  947,
  948,
  949,
  951,
  953,
  954,
  957,
  963,
  965,
  967,
  980,
  981,
  983,
  988,
)


class DatasetNotPreparedError(FileNotFoundError):
  """A supported dataset is not prepared in `data_dir`."""


def _prepare_instructions(dataset: str, data_dir: str | None) -> str:
  d = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
  name = DATASETS[dataset].tfds_name
  if dataset == "imagenet2012":
    return (
      "ImageNet needs a manual download: put ILSVRC2012_img_train.tar and "
      f"ILSVRC2012_img_val.tar into {d}/downloads/manual/ and run "
      f"`tfds build imagenet2012 --data_dir={d}` (no network needed, about "
      "300 GB of disk while building)."
    )
  if dataset == "imagenet2012_real":
    return (
      f"put ILSVRC2012_img_val.tar into {d}/downloads/manual/ and run "
      f"`tfds build imagenet2012_real --data_dir={d}` (it also downloads the "
      "ReaL labels, so it needs network)."
    )
  return (
    f"run `tfds build {name} --data_dir={d}` on a machine with network "
    f"access, then copy {d}/{name}/ into this data_dir."
  )


def _spec(dataset: str) -> DatasetSpec:
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; supported: {sorted(DATASETS)}.")
  return DATASETS[dataset]


def get_builder(dataset: str, data_dir: str | None):
  """TFDS builder of a supported dataset, checked to be readable.

  `digits` is prepared (offline) if needed; any other dataset that is not
  prepared raises `DatasetNotPreparedError` with instructions.
  """
  spec = _spec(dataset)
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if spec.auto_prepare:
    logging.info("Preparing %s in %s (offline, once).", dataset, data_dir)
    with contextlib.redirect_stdout(
      io.StringIO()
    ):  # TFDS prints the line above; stdout is for results
      builder.download_and_prepare()
    return builder
  # Not found on disk. Probing `as_dataset` (instead of failing right away)
  # keeps `tfds.testing.mock_data` working.
  try:
    builder.as_dataset(split=(spec.train_split or spec.eval_splits[0]))
  except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
    raise DatasetNotPreparedError(
      f"Dataset {dataset!r} (TFDS {spec.tfds_name!r}) is not prepared in "
      f"data_dir={str(builder.data_dir_root)!r} (searched {str(builder.data_dir)}). "
      f"How to prepare it: "
      f"{_prepare_instructions(dataset, data_dir)}"
    ) from e
  return builder


def _num_examples(builder, split) -> int:
  """Example count of a (sub)split, from the metadata when available."""
  try:
    n = builder.info.splits[split].num_examples
    if n:
      return int(n)
  except (KeyError, ValueError, AssertionError, TypeError):
    pass
  # No metadata (e.g. under `tfds.testing.mock_data`): count the records.
  ds = builder.as_dataset(split=split, shuffle_files=False)
  n = int(ds.cardinality())
  if n < 0:
    n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
  return n


def dataset_info(dataset: str, *, data_dir: str | None = None) -> tuple[int, int]:
  """(num_classes, num_train_examples); 0 train examples for eval-only sets."""
  spec = _spec(dataset)
  builder = get_builder(dataset, data_dir)
  if spec.train_split is None:
    return spec.num_classes, 0
  return spec.num_classes, _num_examples(builder, spec.train_split)


def eval_size(dataset: str, *, data_dir: str | None = None) -> int:
  """Examples in the default evaluation split of `dataset`."""
  spec = _spec(dataset)
  return _num_examples(get_builder(dataset, data_dir), spec.eval_splits[0])


@functools.cache
def imagenet_r_class_indices() -> tuple[int, ...]:
  """ImageNet-1k indices of the 200 ImageNet-R classes, ascending.

  The evaluator takes `logits[:, imagenet_r_class_indices()]`; `imagenet_r`
  eval batches carry `label` as positions into this tuple (0..199). (TFDS's
  `imagenet_r` stores ImageNet-1k labels; the pipeline remaps them.)
  """
  try:
    names = (
      tfds.builder_cls("imagenet2012")(data_dir="/nonexistent-pf-jax").info.features["label"].names
    )
  except Exception as e:  # pylint: disable=broad-except
    logging.warning(
      "imagenet2012 label names unavailable (%s); using the built-in ImageNet-R index list.", e
    )
    return _IMAGENET_R_CLASS_INDICES_CONST
  pos = {n: i for i, n in enumerate(names)}
  idx = tuple(sorted(pos[w] for w in IMAGENET_R_WNIDS))
  if idx != _IMAGENET_R_CLASS_INDICES_CONST:
    raise ValueError("imagenet2012 label names disagree with the ImageNet-R class index table.")
  return idx


def class_subset(dataset: str) -> np.ndarray | None:
  """Indices into the 1000 ImageNet logits for `dataset`, or None (all)."""
  if _spec(dataset).tfds_name == "imagenet_r":
    return np.asarray(imagenet_r_class_indices(), np.int32)
  return None


# ----------------------------------------------------------------------------
# Randomness: stateless keys derived from (seed, purpose, process, epoch, pos).


def _root_key(seed: int, purpose: int, process_index: int) -> tf.Tensor:
  seed = int(seed)
  key = tf.constant([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, purpose, alg=_RNG_ALG)
  return tf.random.experimental.stateless_fold_in(key, process_index, alg=_RNG_ALG)


def _fold(key, data):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_RNG_ALG)


# ----------------------------------------------------------------------------
# Preprocessing.


def _to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """uint8-valued (any dtype) image -> float32 in [-1, 1]."""
  image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)
  return image / 127.5 - 1.0


def _sample_crop(shape, seed, crop_area_min):
  """(offset_y, offset_x, height, width) of an Inception-style crop."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    image_size=shape,
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
    seed=seed,
    min_object_covered=0.0,
    aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
    area_range=(crop_area_min, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return begin[0], begin[1], size[0], size[1]


def _random_crop_decoded(image, seed, crop_area_min):
  oy, ox, h, w = _sample_crop(tf.shape(image), seed, crop_area_min)
  return tf.slice(image, [oy, ox, 0], [h, w, 3])


def _random_crop_encoded(raw, seed, crop_area_min):
  """Decodes `raw` (any format) and crops; JPEGs only decode the crop."""

  def jpeg():
    oy, ox, h, w = _sample_crop(tf.image.extract_jpeg_shape(raw), seed, crop_area_min)
    return tf.image.decode_and_crop_jpeg(raw, tf.stack([oy, ox, h, w]), channels=3)

  def other():
    image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    return _random_crop_decoded(image, seed, crop_area_min)

  return tf.cond(tf.io.is_jpeg(raw), jpeg, other)


def _train_image(
  image_or_raw, seed, *, encoded: bool, image_size: int, crop_area_min: float, flip: bool
) -> tf.Tensor:
  crop_seed = _fold(seed, 0)
  flip_seed = _fold(seed, 1)
  if encoded:
    image = _random_crop_encoded(image_or_raw, crop_seed, crop_area_min)
  else:
    image = _random_crop_decoded(image_or_raw, crop_seed, crop_area_min)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = _to_unit_range(image)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def _eval_image(image, image_size: int, crop_fraction: float = EVAL_CROP_FRACTION) -> tf.Tensor:
  """Short side -> round(image_size / crop_fraction), central crop."""
  resize = max(int(round(image_size / crop_fraction)), image_size)
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float64)
  w = tf.cast(shape[1], tf.float64)
  scale = float(resize) / tf.minimum(h, w)
  new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), resize)
  new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), resize)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
  oy = (new_h - image_size) // 2
  ox = (new_w - image_size) // 2
  image = tf.slice(image, tf.stack([oy, ox, 0]), [image_size, image_size, 3])
  return tf.ensure_shape(_to_unit_range(image), [image_size, image_size, 3])


def _decode(raw) -> tf.Tensor:
  return tf.io.decode_image(raw, channels=3, expand_animations=False)


def _label_fn(dataset: str):
  """Maps TFDS labels to batch labels (imagenet_r: 1k index -> 0..199)."""
  if _spec(dataset).tfds_name != "imagenet_r":
    return lambda label: tf.cast(label, tf.int32)
  remap = np.full([1000], -1, np.int32)
  remap[np.asarray(imagenet_r_class_indices())] = np.arange(200)
  remap = tf.constant(remap)
  return lambda label: tf.gather(remap, tf.cast(label, tf.int32))


def _resolve_processes(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
  return int(process_index), int(process_count)


def _process_split(split: str, process_index: int, process_count: int):
  if process_count == 1:
    return split
  return tfds.even_splits(split, process_count)[process_index]


def _skip_decoding(spec: DatasetSpec):
  return {spec.image_key: tfds.decode.SkipDecoding()}


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


# ----------------------------------------------------------------------------
# Training.


def train_dataset(
  dataset: str,
  *,
  data_dir: str | None,
  split: str | None = None,
  image_size: int,
  local_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  shuffle_buffer: int = 50_000,
  crop_area_min: float = 0.08,
  flip: bool | None = None,
  in_memory: bool | None = None,
) -> tf.data.Dataset:
  """Infinite tf.data.Dataset of training batches; see `train_iterator`."""
  spec = _spec(dataset)
  split = split or spec.train_split
  if split is None:
    raise ValueError(f"{dataset!r} has no training split; pass `split`.")
  if local_batch_size <= 0 or start_step < 0:
    raise ValueError("need local_batch_size > 0 and start_step >= 0")
  process_index, process_count = _resolve_processes(process_index, process_count)
  in_memory = spec.in_memory if in_memory is None else in_memory
  flip = spec.flip if flip is None else flip
  builder = get_builder(dataset, data_dir)
  sub = _process_split(split, process_index, process_count)
  n = _num_examples(builder, sub)
  if n <= 0:
    raise ValueError(f"{dataset!r} split {sub!r} of process {process_index} is empty.")
  consumed = start_step * local_batch_size
  start_epoch, skip = divmod(consumed, n)
  shuffle_key = _root_key(seed, 1, process_index)
  aug_key = _root_key(seed, 2, process_index)
  label_fn = _label_fn(dataset)
  preprocess = functools.partial(
    _train_image, image_size=image_size, crop_area_min=crop_area_min, flip=flip
  )

  def example_seed(epoch, pos):
    return _fold(_fold(aug_key, epoch), pos)

  if in_memory:
    images, labels = _load_in_memory(builder, spec, sub)
    if len(labels) != n:
      raise ValueError(f"expected {n} examples in {sub!r}, read {len(labels)}")
    images = tf.constant(images)
    labels = tf.constant(labels)

    def epoch_indices(epoch):
      perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=_fold(shuffle_key, epoch), alg=_RNG_ALG
      )
      return tf.data.Dataset.from_tensor_slices(
        (tf.fill([n], epoch), tf.range(n, dtype=tf.int64), perm)
      )

    def load(epoch, pos, index):
      image = preprocess(tf.gather(images, index), example_seed(epoch, pos), encoded=False)
      return {"image": image, "label": label_fn(tf.gather(labels, index))}

    ds = tf.data.Dataset.range(start_epoch, _INF_EPOCHS).flat_map(epoch_indices)
    ds = ds.skip(skip)  # Only indices are skipped: nothing decoded.
  else:
    base = builder.as_dataset(split=sub, shuffle_files=False, decoders=_skip_decoding(spec))
    base = base.map(lambda ex: (ex[spec.image_key], ex[spec.label_key]))

    def epoch_examples(epoch):
      shuffle_seed = tf.random.stateless_uniform(
        [], seed=_fold(shuffle_key, epoch), minval=0, maxval=2**31 - 1, dtype=tf.int64, alg=_RNG_ALG
      )
      d = base.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
      return d.enumerate().map(lambda pos, ex: (epoch, pos, ex[0], ex[1]))

    def load(epoch, pos, raw, label):
      image = preprocess(raw, example_seed(epoch, pos), encoded=True)
      return {"image": image, "label": label_fn(label)}

    ds = tf.data.Dataset.range(start_epoch, _INF_EPOCHS).flat_map(epoch_examples)
    ds = ds.skip(skip)  # Raw (still encoded) records: nothing decoded.

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return _with_options(ds)


def _load_in_memory(builder, spec: DatasetSpec, split):
  """All (image uint8 [N, H, W, 3], label int64 [N]) of a split, in order."""
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: (ex[spec.image_key], ex[spec.label_key]))
  images, labels = [], []
  for im, lb in tfds.as_numpy(ds.batch(4096)):
    images.append(im)
    labels.append(lb)
  images = np.concatenate(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"in-memory datasets need fixed-size images, got {images.shape}")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images.astype(np.uint8), np.concatenate(labels).astype(np.int64)


def train_iterator(dataset: str, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches of `train_dataset(dataset, **kwargs)` (same arguments).

  Yields {'image': float32 [local_batch_size, image_size, image_size, 3] in
  [-1, 1], 'label': int32 [local_batch_size]}. Batch k is a pure function of
  (dataset, split, seed, local_batch_size, process_index, process_count,
  preprocessing arguments, k): `start_step=s` yields batches s, s+1, ...
  bitwise equal to an uninterrupted run. process_index / process_count default
  to jax.process_index() / jax.process_count(); each process reads its own
  `tfds.even_splits(split, process_count)[process_index]`. `in_memory`
  (default: per `DATASETS`) decodes the split once into RAM; otherwise records
  are streamed through a `shuffle_buffer`-sized buffer. `flip=None` uses the
  dataset default (`DatasetSpec.flip`: True, except False for digits).
  `crop_area_min` is the Inception crop's minimum area fraction (1.0 = no
  crop, just resize).
  """
  return iter(train_dataset(dataset, **kwargs).as_numpy_iterator())


# ----------------------------------------------------------------------------
# Evaluation.


def num_eval_batches(
  dataset: str,
  *,
  data_dir: str | None,
  split: str | None = None,
  local_batch_size: int,
  process_count: int | None = None,
) -> int:
  """Batches every process yields in one `eval_iterator` pass."""
  spec = _spec(dataset)
  split = split or spec.eval_splits[0]
  if process_count is None:
    _, process_count = _resolve_processes(0, None)
  total = _num_examples(get_builder(dataset, data_dir), split)
  return math.ceil(math.ceil(total / process_count) / local_batch_size)


def eval_dataset(
  dataset: str,
  *,
  data_dir: str | None,
  split: str | None = None,
  image_size: int,
  local_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """Finite tf.data.Dataset of eval batches; see `eval_iterator`."""
  spec = _spec(dataset)
  split = split or spec.eval_splits[0]
  process_index, process_count = _resolve_processes(process_index, process_count)
  builder = get_builder(dataset, data_dir)
  total = _num_examples(builder, split)
  num_batches = math.ceil(math.ceil(total / process_count) / local_batch_size)
  label_fn = _label_fn(dataset)
  num_classes = spec.num_classes

  def prepare(ex):
    out = {
      "image": _eval_image(_decode(ex[spec.image_key]), image_size),
      "label": label_fn(ex[spec.label_key]),
      "mask": tf.constant(1.0, tf.float32),
    }
    if spec.real_label_key is not None:
      real = tf.cast(tf.reshape(ex[spec.real_label_key], [-1]), tf.int32)
      multi_hot = tf.reduce_max(tf.one_hot(real, num_classes, dtype=tf.float32), axis=0)
      # reduce_max over zero rows gives -inf: no ReaL label -> all zeros.
      out["real_label"] = tf.maximum(multi_hot, 0.0)
      out["real_valid"] = tf.cast(tf.size(real) > 0, tf.float32)
    return out

  # No autocache: each pass builds a new dataset, and a pass may stop early (sharpness reads
  # the first batches of a training split), which a cached dataset warns about.
  ds = builder.as_dataset(
    split=_process_split(split, process_index, process_count),
    shuffle_files=False,
    decoders=_skip_decoding(spec),
    read_config=tfds.ReadConfig(try_autocache=False),
  )
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
    tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  ).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch_size)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return _with_options(ds)


def eval_iterator(dataset: str, **kwargs) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches of `eval_dataset(dataset, **kwargs)` (same arguments).

  One pass over an eval split, in fixed order, padded to full batches.

  Yields {'image': float32 [B, S, S, 3], 'label': int32 [B], 'mask': float32
  [B] (1 real example, 0 padding)} and, for imagenet2012_real,
  'real_label': float32 [B, 1000] multi-hot and 'real_valid': float32 [B]
  (1 iff the example has at least one ReaL label; skip the others in the ReaL
  metric). Every process yields exactly
  ceil(ceil(num_examples / process_count) / B) batches. For imagenet_r,
  `label` indexes `imagenet_r_class_indices()` (see there).
  """
  return iter(eval_dataset(dataset, **kwargs).as_numpy_iterator())


# ----------------------------------------------------------------------------
# Device transfer.


def prefetch_to_device(iterator: Iterator[Any], size: int = 2, sharding=None) -> Iterator[Any]:
  """Puts numpy batches on device(s) `size` batches ahead (no threads).

  With `sharding` (a `jax.sharding.Sharding`, e.g. a NamedSharding over the
  global mesh with the batch axis sharded), each process's local batch becomes
  its part of a global jax.Array via `jax.make_array_from_process_local_data`
  (this also covers the single-process case). Without it, `jax.device_put`.
  Transfers are asynchronous, so keeping `size` batches in flight overlaps
  them with compute.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if sharding is None:
    put = jax.device_put
  else:

    def put(batch):
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  queue = collections.deque()
  for batch in iterator:
    queue.append(put(batch))
    if len(queue) >= max(size, 1):
      yield queue.popleft()
  while queue:
    yield queue.popleft()
