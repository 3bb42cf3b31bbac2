"""Base optimizers of Table C.1 (optax transformations) and the shrink-and-perturb baseline."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pf_jax.schedules import ScalarOrSchedule

NO_DECAY_NAMES = ("pos_embedding",)


def weight_decay_mask(params) -> Any:
  """True where weight decay applies: not on 1-D leaves (norm scales), biases of any shape
  (flax's attention biases are [heads, head_dim]), nor position embeddings (any leaf whose path
  contains 'pos_embedding') -- the authors' groups: `ndim <= 1 or name.endswith('.bias')` and
  timm's `no_weight_decay()`."""

  def decays(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    is_bias = bool(names) and names[-1] == "bias"
    return jnp.ndim(leaf) > 1 and not is_bias and not any(n in NO_DECAY_NAMES for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def sgdw(
  learning_rate: ScalarOrSchedule,
  *,
  momentum: float,
  weight_decay: float,
  mask=weight_decay_mask,
) -> optax.GradientTransformation:
  """SGD with momentum and decoupled weight decay:
  v <- momentum * v + g;   theta <- theta - lr_t * v - lr_t * wd * theta  (masked).

  `momentum` and `weight_decay` are required (0 turns either off): they change what is optimized.
  """
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  return optax.chain(
    optax.trace(decay=momentum) if momentum else optax.identity(),
    optax.add_decayed_weights(weight_decay, mask) if weight_decay else optax.identity(),
    optax.scale_by_learning_rate(learning_rate),
  )


def adamw(
  learning_rate: ScalarOrSchedule,
  *,
  weight_decay: float,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  mask=weight_decay_mask,
) -> optax.GradientTransformation:
  """AdamW (decoupled: theta <- theta - lr_t * (adam_step + wd * theta), masked).

  `weight_decay` is required (0 turns it off; optax's own default is 1e-4); b1, b2, eps default to
  Adam's published values.
  """
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)


def shrink_and_perturb(
  factor: float, learning_rate: ScalarOrSchedule, lr_max: float | None = None
) -> Callable[[Any, Any, Any], Any]:
  """Shrink-and-perturb (Appendix B) as the authors' train.py places it: before each update's
  forward pass the whole state -- parameters and BatchNorm statistics -- moves toward its initial
  values,
    theta <- (1 - f_t) theta + f_t theta_0,  f_t = factor * lr_t / lr_max,
  so the update's gradient is taken at the shrunk state (and the base optimizer steps from it).

  Args:
    factor: f at the peak learning rate, in [0, 1] (0: off, 1: reset to theta_0 every step).
    learning_rate: the run's learning rate, a float or a schedule step -> lr_t.
    lr_max: the peak learning rate (required with a schedule; a float `learning_rate` is its own).

  Returns:
    shrink(tree, init_tree, step) -> tree: pure, for use inside `jit` (apply it to the params and
    to the BatchNorm statistics, each with its own initial values).

  Example:
    >>> shrink = pf_jax.shrink_and_perturb(0.1, 0.5)
    >>> shrink({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, 0)["w"]  # [0.9, 0.9]
  """
  if not 0.0 <= factor <= 1.0:
    raise ValueError(f"factor must be in [0, 1], got {factor}")
  if callable(learning_rate) and not lr_max:
    raise ValueError("lr_max (> 0) is required when learning_rate is a schedule")
  lr_max = lr_max or learning_rate

  def shrink(tree, init_tree, step):
    lr = learning_rate(step) if callable(learning_rate) else learning_rate
    f = factor * lr / lr_max
    # theta + f (theta_0 - theta): (1 - f) theta + f theta_0 without rounding 1 - f.
    return jax.tree.map(lambda x, x0: jnp.asarray(x + f * (x0 - x), x.dtype), tree, init_tree)

  return shrink
