"""Learning-rate and perturbation-radius schedules (optax schedules: step -> value)."""

from collections.abc import Callable

import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]
ScalarOrSchedule = float | Schedule


def warmup_linear_decay(
  lr_max: float, lr_min: float, warmup_steps: int, total_steps: int
) -> Schedule:
  """Linear warmup 0 -> lr_max over `warmup_steps`, then linear decay to lr_min at `total_steps`."""
  if lr_max < 0 or lr_min < 0:
    raise ValueError(f"lr_max and lr_min must be >= 0, got {lr_max}, {lr_min}")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, lr_max, warmup_steps),
      optax.linear_schedule(lr_max, lr_min, max(total_steps - warmup_steps, 1)),
    ],
    [warmup_steps],
  )
  # The step as a float of the default precision: float32 (the same values as from optax's int32
  # step counts), float64 under jax_enable_x64, where an int32 count would give float32 rates.
  return lambda step: schedule(jnp.asarray(step, dtype=float))


def lr_proportional_rho(
  lr_schedule: Schedule, lr_max: float, lr_min: float, rho_max: float, rho_min: float
) -> Schedule:
  """rho_t = max(0, rho_min + (lr_t - lr_min) / (lr_max - lr_min) * (rho_max - rho_min)).

  The GSAM policy the paper uses for SAM/GSAM with steepest ascent: rho follows the
  learning rate's warmup and decay.
  """
  if lr_max == lr_min:
    raise ValueError(f"lr_proportional_rho needs lr_max != lr_min, both are {lr_max}")
  if rho_max < 0 or rho_min < 0:
    raise ValueError(f"rho must be >= 0, got rho_max={rho_max}, rho_min={rho_min}")

  def schedule(step):
    frac = (lr_schedule(step) - lr_min) / (lr_max - lr_min)
    return jnp.maximum(0.0, rho_min + frac * (rho_max - rho_min))

  return schedule
