"""Image preprocessing of the input pipeline: stateless keys, Inception crops, evaluation crops.

Every random choice is a function of a stateless key folded from (seed, purpose, process, epoch,
position), so an example's augmentation does not depend on where reading started.

Training augmentation: Inception crop (`stateless_sample_distorted_bounding_box`
with area range (crop_area_min, 1) and aspect ratio (3/4, 4/3)), bilinear
(antialiased) resize to image_size x image_size, optional horizontal flip.
Evaluation: resize (aspect-preserving, `interpolation`: bilinear or bicubic, antialiased) so the
short side is round(image_size / 0.875), then a central image_size crop; the same math is used
for 8x8 digits and 32x32 CIFAR.
Pixel values: `normalization` "minus_one_to_one" maps p to p / 127.5 - 1 (mean = std = 0.5, the
authors' ViT statistics); "imagenet" to (p / 255 - mean) / std with ImageNet's mean and std (the
authors' ResNet statistics).
"""

from __future__ import annotations

import pf_jax.before_tensorflow  # noqa: F401  # isort: skip  (first: its doc)
import tensorflow as tf

from pf_jax.dataset_catalog import NORMALIZATIONS

EVAL_CROP_FRACTION = 0.875
RNG_ALG = "philox"  # Fixed algorithm: results never depend on the device.


# Randomness: stateless keys derived from (seed, purpose, process, epoch, pos).


def root_key(seed: int, purpose: int, process_index: int) -> tf.Tensor:
  """The stateless key of one use of randomness (shuffling, augmentation) on one process."""
  seed = int(seed)
  key = tf.constant([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], tf.int64)
  key = tf.random.experimental.stateless_fold_in(key, purpose, alg=RNG_ALG)
  return tf.random.experimental.stateless_fold_in(key, process_index, alg=RNG_ALG)


def fold(key, data):
  """`key` folded with an integer (epoch, position, crop or flip)."""
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=RNG_ALG)


def normalize(image: tf.Tensor, normalization: str = "minus_one_to_one") -> tf.Tensor:
  """uint8-valued (any dtype) image -> float32 by `NORMALIZATIONS[normalization]`."""
  image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)
  stats = NORMALIZATIONS[normalization]
  if stats is None:
    return image / 127.5 - 1.0
  mean, std = (tf.constant(v, tf.float32) for v in stats)
  return (image / 255.0 - mean) / std


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


def train_image(
  image_or_raw,
  seed,
  *,
  encoded: bool,
  image_size: int,
  crop_area_min: float,
  flip: bool,
  normalization: str = "minus_one_to_one",
) -> tf.Tensor:
  crop_seed = fold(seed, 0)
  flip_seed = fold(seed, 1)
  if encoded:
    image = _random_crop_encoded(image_or_raw, crop_seed, crop_area_min)
  else:
    image = _random_crop_decoded(image_or_raw, crop_seed, crop_area_min)
  image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  image = normalize(image, normalization)
  return tf.ensure_shape(image, [image_size, image_size, 3])


def eval_image(
  image,
  image_size: int,
  crop_fraction: float = EVAL_CROP_FRACTION,
  *,
  interpolation: str = "bilinear",
  normalization: str = "minus_one_to_one",
) -> tf.Tensor:
  """Short side -> round(image_size / crop_fraction), central crop."""
  resize = max(int(round(image_size / crop_fraction)), image_size)
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float64)
  w = tf.cast(shape[1], tf.float64)
  scale = float(resize) / tf.minimum(h, w)
  new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), resize)
  new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), resize)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method=interpolation, antialias=True)
  oy = (new_h - image_size) // 2
  ox = (new_w - image_size) // 2
  image = tf.slice(image, tf.stack([oy, ox, 0]), [image_size, image_size, 3])
  return tf.ensure_shape(normalize(image, normalization), [image_size, image_size, 3])


def decode(raw) -> tf.Tensor:
  """Encoded image bytes (any format TensorFlow reads) -> uint8 [H, W, 3]."""
  return tf.io.decode_image(raw, channels=3, expand_animations=False)
