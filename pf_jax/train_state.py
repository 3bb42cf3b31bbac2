"""Flax's `TrainState` for `pf_jax.sam`: `apply_gradients` passes `forward` and `batch` on.

Flax's own `TrainState.apply_gradients(grads=, **kwargs)` calls `tx.update(grads, opt_state,
params)` and treats every other keyword as a field to replace, so `pf_jax.sam` never sees the
forward function and batch it needs.
"""

from typing import Any

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """`flax.training.train_state.TrainState` whose `apply_gradients` feeds `pf_jax.sam`.

  Subclass it for extra fields (e.g. `batch_stats`) as with Flax's.

  Example:
    >>> state = pf_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> state = state.apply_gradients(grads=grads, forward=forward, batch=batch)
  """

  def apply_gradients(self, *, grads, forward=None, batch=None, rng=None, **kwargs: Any):
    """One step: `tx.update(grads, opt_state, params, forward=, batch=, rng=)`.

    Args:
      grads: the gradient of the task loss at `params` on `batch`.
      forward: (params, batch) -> logits (or (logits, aux)), as `pf_jax.sam` takes it.
      batch: this step's batch.
      rng: this step's PRNG key (objective="random" needs it).
      **kwargs: other fields to replace, as in Flax (e.g. `batch_stats=`).

    Returns:
      The state with `step` + 1, new `params` and `opt_state`, and `kwargs` replaced.
    """
    given = dict(forward=forward, batch=batch, rng=rng)
    extra = {k: v for k, v in given.items() if v is not None}  # a plain optax tx takes none
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      **kwargs,
    )
