"""Perturbation objectives L^p: what SAM *ascends* to find its perturbation.

An objective is a function `(logits, batch) -> scalar` whose gradient with respect to the
parameters (through the logits) is the ascent direction g_p. Besides callables, the SAM
transformation accepts two names:

- ``"steepest"``: L^p is the task loss itself (standard SAM);
- ``"random"``: g_p ~ N(0, I), independent of the data (Appendix B baseline).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pf_jax import losses
from pf_jax.errors import ArgumentError

ObjectiveFn = Callable[[jax.Array, Any], jax.Array]  # (logits, batch) -> scalar
Objective = str | ObjectiveFn
OBJECTIVE_NAMES = ("steepest", "random")
PREDICTIONS = ("softmax", "sigmoid")


def obf_alpha(p_y: jax.Array, lam: float, gamma: float) -> jax.Array:
  """Forgetting strength, paper Eq. 17: alpha = gamma * max((1 - lam / p_y) / (1 - lam), 0).

  lam = 0 gives alpha = gamma exactly (also where p_y underflows to 0).
  """
  _check_unit("obf_alpha", "gamma", gamma, closed=True)
  _check_unit("obf_alpha", "lam", lam, closed=False)
  if lam == 0.0:
    return jnp.full_like(p_y, gamma)
  return gamma * jnp.maximum((1.0 - lam / p_y) / (1.0 - lam), 0.0)


def obf(lam: float, gamma: float, predictions: str) -> ObjectiveFn:
  """Output-bias forgetting objective (Eq. 15-17, Algorithm A.1), alpha from Eq. 17.

  Per example, with p = softmax(z) or sigmoid(z) and alpha held constant,
    dL^BF/dz = u - (alpha * p + (1 - alpha) * onehot(y)),   u = 1/C,
  i.e. the gradient of (1 - alpha) CE(y, z) - CE(uniform, z) for softmax. Mean over examples.
  `lam` is the paper's lambda in [0, 1) (1/C in the paper), `gamma` in [0, 1]. The labels are
  read from the batch (`losses.labels_of`); targets [B, C] stand in for onehot(y) and give
  p_y = <p, t>. `predictions` ("softmax" or "sigmoid") must match the task loss: nothing is
  assumed (the paper: gamma 1, lam 1/C, sigmoid for its BCE-trained ViTs).

  Example:
    >>> objective = pf_jax.obf(lam=1 / 10, gamma=1.0, predictions="softmax")
  """
  _check_unit("obf", "gamma", gamma, closed=True)
  _check_unit("obf", "lam", lam, closed=False)
  _check_predictions("obf", predictions)

  def alpha_fn(p, targets):
    return obf_alpha(jnp.sum(p * targets, axis=-1), lam, gamma)

  return _obf_objective(alpha_fn, predictions)


def obf_fixed_alpha(alpha: float, predictions: str) -> ObjectiveFn:
  """OBF with a constant forgetting strength alpha in [0, 1] (ablation of Table B.2)."""
  _check_unit("obf_fixed_alpha", "alpha", alpha, closed=True)
  _check_predictions("obf_fixed_alpha", predictions)
  return _obf_objective(lambda p, targets: jnp.full(p.shape[:-1], alpha, p.dtype), predictions)


def _obf_objective(alpha_fn, predictions: str) -> ObjectiveFn:
  def objective(logits: jax.Array, batch) -> jax.Array:
    z = jax.lax.stop_gradient(logits)
    p = jax.nn.softmax(z) if predictions == "softmax" else jax.nn.sigmoid(z)
    labels = losses.labels_of(batch)
    num_classes = logits.shape[-1]
    y = (
      labels.astype(p.dtype)
      if labels.ndim == 2
      else jax.nn.one_hot(labels, num_classes, dtype=p.dtype)
    )
    alpha = alpha_fn(p, y)[:, None]
    coef = 1.0 / num_classes - alpha * p - (1.0 - alpha) * y
    # Linear in z with frozen coefficients: its z-gradient is exactly `coef`.
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(coef) * logits, axis=-1))

  return objective


def _check_unit(function: str, name: str, value: float, closed: bool) -> None:
  ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
  if not ok:
    raise ArgumentError(
      function, name, f"{name} must be in [0, 1{']' if closed else ')'}, got {value}"
    )


def _check_predictions(function: str, predictions: str) -> None:
  if predictions not in PREDICTIONS:
    raise ArgumentError(
      function, "predictions", f"predictions must be one of {PREDICTIONS}, got {predictions!r}"
    )
