"""Sharpness: the dominant eigenvalue of the loss Hessian (the "SHARPNESS" column of Tables 1, B.1).

Power iteration v <- Hv / ||Hv|| with Hessian-vector products computed forward-over-reverse
(`jax.jvp` of `jax.grad`), never forming H. The eigenvalue estimate is the Rayleigh quotient
<v, Hv> of the unit vector v, so its sign is kept; power iteration converges to the eigenvalue of
largest magnitude. Data parallel: the batches are dealt to the devices (padded with zero-weight
copies to a multiple of the device count), each device sums its batches' HVPs and one `psum`
adds them, so 1 and 8 devices compute the same mean up to float summation order.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pf_jax import sharding

AXIS = "batches"


def hessian_top_eigenvalue(
  loss_fn: Callable[[Any, Any], jax.Array],
  params,
  batches,
  *,
  num_iters: int = 100,
  tol: float = 1e-4,
  rng: jax.Array,
  devices: Sequence[jax.Device] | None = None,
  progress: Callable[[int, float], None] | None = None,
) -> float:
  """Dominant eigenvalue of the Hessian of mean_b loss_fn(params, batches[b]).

  Args:
    loss_fn: (params, batch) -> scalar loss of one batch.
    params: the point theta (any pytree; float64 leaves compute in float64 under `jax_enable_x64`).
    batches: a pytree whose leaves have a leading axis of B equal-size batches (or a sequence of
      B batch pytrees, stacked here).
    num_iters: maximum number of power iterations (Hessian-vector products).
    tol: stop when |lambda_k - lambda_{k-1}| <= tol * |lambda_k|.
    rng: PRNG key of the random start vector.
    devices: devices to spread the batches over (default: this process's devices).
    progress: called on the host as progress(iteration, eigenvalue estimate) after every
      iteration (a host callback; None: none).

  Returns:
    The eigenvalue estimate of largest magnitude, as a Python float.
  """
  if (
    not isinstance(batches, dict)
    and isinstance(batches, (list, tuple))
    and batches
    and not hasattr(batches[0], "shape")
  ):
    batches = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  num_batches = jax.tree.leaves(batches)[0].shape[0]
  devices = list(devices or jax.local_devices())
  pad = -num_batches % len(devices)
  dtype = jax.tree.leaves(params)[0].dtype
  weights = np.concatenate([np.ones(num_batches), np.zeros(pad)]).astype(dtype)
  if pad:  # zero-weight copies of the first batch, so every device has as many batches
    batches = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], pad, axis=0)]), batches)
  mesh = Mesh(np.asarray(devices), (AXIS,))
  power_iteration = power_iteration_program(
    loss_fn, mesh, num_batches, dtype, num_iters=num_iters, tol=tol, progress=progress
  )

  # Explicit placement: params may arrive committed to one device (e.g. restored from a checkpoint).
  replicated, dealt = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  params = jax.device_put(params, replicated)
  batches, weights = jax.device_put((batches, weights), dealt)
  return float(power_iteration(params, batches, weights, jax.device_put(rng, replicated)))


def power_iteration_program(
  loss_fn: Callable[[Any, Any], jax.Array],
  mesh: Mesh,
  num_batches: int,
  dtype,
  *,
  num_iters: int,
  tol: float,
  progress: Callable[[int, float], None] | None = None,
):
  """The jitted power iteration of `hessian_top_eigenvalue`: (params replicated over `mesh`,
  batches and weights dealt over its `AXIS`, key) -> eigenvalue. Also what
  `main.py --compile_for` compiles for a TPU slice."""

  def local_hvp(params, v, xs, ws):
    params, v = sharding.per_device((params, v), AXIS)  # each device's own HVP, summed below

    def add_one(total, batch_and_weight):
      batch, w = batch_and_weight
      _, hv = jax.jvp(lambda p: jax.grad(loss_fn)(p, batch), (params,), (v,))
      return optax.tree.add(total, optax.tree.scale(w, hv)), None

    total, _ = lax.scan(add_one, optax.tree.zeros_like(params), (xs, ws))
    return optax.tree.scale(1.0 / num_batches, lax.psum(total, AXIS))

  hvp = jax.shard_map(local_hvp, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)), out_specs=P())

  @jax.jit
  def power_iteration(params, xs, ws, key):
    v = optax.tree.random_like(key, params, jax.random.normal)
    v = optax.tree.scale(1.0 / optax.tree.norm(v), v)

    def not_done(carry):
      i, eig, prev, _ = carry
      return (i < num_iters) & ((i < 2) | (jnp.abs(eig - prev) > tol * jnp.abs(eig)))

    def step(carry):
      i, eig, _, v = carry
      hv = hvp(params, v, xs, ws)
      new_eig = optax.tree.vdot(v, hv)
      if progress is not None:
        jax.debug.callback(lambda k, e: progress(int(k), float(e)), i + 1, new_eig)
      return i + 1, new_eig, eig, optax.tree.scale(1.0 / optax.tree.norm(hv), hv)

    zero = jnp.zeros((), dtype)
    _, eig, _, _ = lax.while_loop(not_done, step, (jnp.zeros((), jnp.int32), zero, zero, v))
    return eig

  return power_iteration
