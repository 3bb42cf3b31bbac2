"""Task losses: softmax and sigmoid cross-entropy with label smoothing.

Both take logits [B, C] and the batch (or its labels) and return a scalar: the mean over the
batch of a per-example loss. Labels are integers [B] or targets [B, C] (one-hot or soft).
Label smoothing s uses the target (1 - s) * t + s / C.
"""

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from pf_jax.errors import ArgumentError

LossFn = Callable[[jax.Array, Any], jax.Array]  # (logits, batch) -> scalar mean loss


def labels_of(batch) -> jax.Array:
  """The labels of a batch: batch["label"] of a dict, the last entry of an (inputs, labels)
  tuple, or the batch itself when it is an array of labels."""
  if isinstance(batch, Mapping):
    if "label" not in batch:  # a bare KeyError would not say what to pass instead
      raise ArgumentError(
        "labels_of",
        "batch",
        f"the batch has no 'label' key (its keys: {', '.join(map(repr, batch))}): losses and "
        "OBF read batch['label'], the last entry of an (inputs, labels) tuple, or a label "
        "array; pass e.g. {'image': x, 'label': y} or (x, y)",
      )
    return batch["label"]
  if isinstance(batch, (tuple, list)):
    return batch[-1]
  return batch


def smoothed_targets(
  labels: jax.Array, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
  """(1 - s) * t + s / C with t = onehot(labels) for integer labels, else the given targets."""
  onehot = labels if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    onehot = (1.0 - label_smoothing) * onehot + label_smoothing / num_classes
  return onehot


def _check_smoothing(label_smoothing: float) -> None:
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _targets(name: str, logits, batch, label_smoothing: float, min_classes: int) -> jax.Array:
  """The smoothed targets of `batch`, refused where a classification loss cannot apply (a
  regression model trained with it would get a zero or meaningless gradient, silently)."""
  _check_smoothing(label_smoothing)
  labels = labels_of(batch)
  integer = jnp.issubdtype(labels.dtype, jnp.integer)
  ok_labels = (labels.ndim == 1 and integer) or (labels.ndim == 2 and labels.shape == logits.shape)
  if logits.ndim != 2 or logits.shape[-1] < min_classes or not ok_labels:
    raise ValueError(
      f"{name} is a classification loss: it needs logits [B, C] (C >= {min_classes}) and integer "
      f"labels [B] or targets [B, C], got logits {logits.shape} and labels {labels.dtype} "
      f"{labels.shape}; for regression pass your own loss, e.g. lambda out, batch: "
      "jnp.mean((out - batch[1]) ** 2)"
    )
  return smoothed_targets(labels, logits.shape[-1], label_smoothing).astype(logits.dtype)


def softmax_cross_entropy(logits: jax.Array, batch, label_smoothing: float = 0.0) -> jax.Array:
  """mean_b [ -sum_c t_bc log softmax(z_b)_c ]."""
  targets = _targets("softmax_cross_entropy", logits, batch, label_smoothing, 2)
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


def sigmoid_cross_entropy(logits: jax.Array, batch, label_smoothing: float = 0.0) -> jax.Array:
  """The "BCE" of Beyer et al. (2020): mean_b sum_c BCE(sigmoid(z_bc), t_bc).

  Summed (not averaged) over classes, so its scale matches softmax cross-entropy.
  """
  targets = _targets("sigmoid_cross_entropy", logits, batch, label_smoothing, 1)
  per_class = -(
    targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits)
  )
  return jnp.mean(jnp.sum(per_class, axis=-1))


# Config names of the losses.
LOSSES = {"softmax_xent": softmax_cross_entropy, "sigmoid_xent": sigmoid_cross_entropy}


def get_loss(name: str, label_smoothing: float = 0.0) -> LossFn:
  """Loss by config name: 'softmax_xent' (the paper's CE) or 'sigmoid_xent' (BCE)."""
  _check_smoothing(label_smoothing)
  if name not in LOSSES:
    raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
  fn = LOSSES[name]
  return lambda logits, batch: fn(logits, batch, label_smoothing)
