"""tf.data / TFDS input pipeline of pf_jax (TensorFlow runs on the CPU only).

Datasets: see `DATASETS` (pf_jax/dataset_catalog.py, the one table with splits, class counts and feature
keys). `digits` (pf_jax.datasets.digits) is prepared automatically and offline;
every other dataset must already be prepared in `data_dir` (a clear error says
how otherwise).

Image values: every batch carries `image` float32 [B, H, W, 3], by default in [-1, 1]
(uint8 pixel p -> p / 127.5 - 1; `normalization`: pf_jax/preprocessing.py). Labels are int32.

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

Training augmentation and evaluation crops: `pf_jax.preprocessing`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import itertools
import math
from collections.abc import Iterator
from typing import Any

import pf_jax.before_tensorflow  # noqa: F401  # isort: skip  (first: its doc)
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

import pf_jax.datasets  # noqa: F401  (registers the `digits` TFDS builder)
from pf_jax import preflight
from pf_jax import preprocessing
from pf_jax.dataset_catalog import DATASETS  # noqa: F401  (re-exported)
from pf_jax.dataset_catalog import DatasetSpec  # noqa: F401  (re-exported)

# TensorFlow is only the CPU input pipeline: never let it take accelerators.
try:
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError) as _e:  # Already initialised / no GPU API.
  logging.warning("input_pipeline: could not hide GPUs from TF: %s", _e)

_INF_EPOCHS = 2**62


class DatasetNotPreparedError(FileNotFoundError):
  """A supported dataset is not prepared in `data_dir`."""


def _prepare_instructions(dataset: str, data_dir: str | None) -> str:
  d = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
  return preflight.prepare_instructions(dataset, d)


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


def class_subset(dataset: str) -> np.ndarray | None:
  """Indices into the 1000 ImageNet logits for `dataset`, or None (all).

  Args:
    dataset: a name of `DATASETS`.

  Returns:
    `DATASETS[dataset].logit_subset` as an int32 array, or None.
  """
  subset = _spec(dataset).logit_subset
  return None if subset is None else np.asarray(subset, np.int32)


def _label_fn(dataset: str):
  """Maps TFDS labels to batch labels (imagenet_r: 1k index -> 0..199)."""
  subset = _spec(dataset).logit_subset
  if subset is None:
    return lambda label: tf.cast(label, tf.int32)
  remap = np.full([1000], -1, np.int32)
  remap[np.asarray(subset)] = np.arange(len(subset))
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
  normalization: str = "minus_one_to_one",
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
  shuffle_key = preprocessing.root_key(seed, 1, process_index)
  aug_key = preprocessing.root_key(seed, 2, process_index)
  label_fn = _label_fn(dataset)
  preprocess = functools.partial(
    preprocessing.train_image,
    image_size=image_size,
    crop_area_min=crop_area_min,
    flip=flip,
    normalization=normalization,
  )

  def example_seed(epoch, pos):
    return preprocessing.fold(preprocessing.fold(aug_key, epoch), pos)

  if in_memory:
    images, labels = _load_in_memory(builder, spec, sub)
    if len(labels) != n:
      raise ValueError(f"expected {n} examples in {sub!r}, read {len(labels)}")
    images = tf.constant(images)
    labels = tf.constant(labels)

    def epoch_indices(epoch):
      perm = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64),
        seed=preprocessing.fold(shuffle_key, epoch),
        alg=preprocessing.RNG_ALG,
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
        [],
        seed=preprocessing.fold(shuffle_key, epoch),
        minval=0,
        maxval=2**31 - 1,
        dtype=tf.int64,
        alg=preprocessing.RNG_ALG,
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
  crop, just resize). `normalization`: `preprocessing.NORMALIZATIONS` (the
  default gives [-1, 1]).
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
  interpolation: str = "bilinear",
  normalization: str = "minus_one_to_one",
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
      "image": preprocessing.eval_image(
        preprocessing.decode(ex[spec.image_key]),
        image_size,
        interpolation=interpolation,
        normalization=normalization,
      ),
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


MAX_SHARED_STREAMS = 6  # a search point's 3 seeds in a row; 3 evaluation sets


def cached_batches(cache: dict | None, key, make) -> Iterator[Any]:
  """`make()`'s batches, computed once in this process for every run that reads the same ones.

  A launcher trains several methods on one seed (the same batches: their order and augmentation
  are functions of the dataset arguments and the seed only) and evaluates every run on the same
  sets. The batches are kept in `cache["batches"]` (the MAX_SHARED_STREAMS streams used last) and
  computed as they are first read, so a run that stops early computes no more than it reads.

  Args:
    cache: a dict kept across runs, or None: `make()` itself.
    key: every argument the batches depend on (hashable).
    make: () -> an iterator of numpy batches.

  Returns:
    An iterator of the batches, from the first.
  """
  if cache is None:
    return make()
  streams = cache.setdefault("batches", collections.OrderedDict())
  if key not in streams:
    streams[key] = ([], make())
    while len(streams) > MAX_SHARED_STREAMS:
      streams.popitem(last=False)
  streams.move_to_end(key)
  batches, source = streams[key]

  def read():
    for k in itertools.count():
      if k == len(batches):
        try:
          batches.append(next(source))
        except StopIteration:
          return
      yield batches[k]

  return read()


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
