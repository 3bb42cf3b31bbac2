"""The SAM family (SAM, m-SAM, GSAM, ASAM, random, OBF): one functional core, one optax wrapper.

`sam_value_and_grad` is shaped like `jax.value_and_grad`: it returns the SAM-family update
gradient of a batch, averaged over its m-chunks, accumulation micro-batches and devices. `sam`
wraps it and any base optax optimizer into an `optax.GradientTransformationExtraArgs` that reuses
the incoming gradient as the ascent direction when it is exactly that. `perturbed_logits` (the
forgetting analysis) shares `_perturb`, the one computation of theta^p.

Per m-sized chunk S (docs/sam-family.md):
  g_p = grad L^p(theta; S)                  (task loss, OBF objective, or N(0, I))
  g_p <- w * g_p                            (ASAM "before"/"both", w = |theta| + eta)
  d   = g_p / (||g_p|| + eps);  d <- w * d  (ASAM "after"/"both")
  g   = grad L(theta + rho_t d; S)
  g  <- g - xi (b - <b, u> u),  u = g / (||g|| + eps),  b = g_p or d  (GSAM)
and the update gradient is the mean of g over all chunks of the global batch.
"""

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from pf_jax import losses
from pf_jax import perturbations
from pf_jax import sharding
from pf_jax.errors import ArgumentError
from pf_jax.schedules import ScalarOrSchedule

EPS = 1e-12
ASAM_MODES = ("before", "after", "both")
# How a device computes its m-chunks: together (vmap), one after another in a loop (scan, the
# memory of one chunk), one after another written out in the program (unroll), or "auto".
CHUNK_MODES = ("auto", "vmap", "scan", "unroll")
# "auto" unrolls up to this many chunks per device, beyond it scans (compile time and program
# size grow with every unrolled chunk). Measured in docs/sam-family.md ("Chunk strategies").
MAX_UNROLLED_CHUNKS = 16
# "auto" unrolls up to this many chunks per device on each platform (others: MAX_UNROLLED_CHUNKS).
# TPU: scan from 2 chunks on. Compiled for a v4 (docs/benchmarks.md, "Compiled for TPU"), scan
# needs the same FLOPs, less than half unroll's memory at 8 chunks and a fraction of its compile
# time; XLA:CPU's slow loops (convolutions) are what made the CPU rule unroll.
AUTO_RULES = {"cpu": MAX_UNROLLED_CHUNKS, "tpu": 1}
METRIC_NAMES = ("loss", "perturbed_loss", "ascent_norm", "rho")

Forward = Callable[[Any, Any], Any]  # (params, batch) -> logits, or (logits, aux) if has_aux
LossFn = losses.LossFn  # (logits, batch) -> scalar mean task loss

LOSS_FN_HELP = (
  "the task loss (logits, batch) -> scalar mean that training minimizes, e.g. "
  "pf_jax.softmax_cross_entropy for classification or "
  "lambda out, batch: jnp.mean((out - batch[1]) ** 2) for regression"
)


def _checked_loss(loss_fn, where: str) -> LossFn:
  """`loss_fn`, refused unless callable and, when traced, returning a scalar."""
  if loss_fn is None or not callable(loss_fn):
    raise TypeError(f"{where} needs loss_fn=, {LOSS_FN_HELP}; got {loss_fn!r}")

  def checked(logits, batch):
    loss = loss_fn(logits, batch)
    if jnp.shape(loss) != ():
      raise ValueError(
        f"{where}: loss_fn must return a scalar mean, got shape {jnp.shape(loss)}; "
        f"loss_fn is {LOSS_FN_HELP}"
      )
    return loss

  return checked


@dataclasses.dataclass(frozen=True)
class SamSpec:
  """Hyperparameters of one member of the SAM family, validated on construction.

  Attributes:
    rho: perturbation radius, a float >= 0 or a schedule step -> rho_t.
    objective: "steepest" (the task loss), "random", or a callable (logits, batch) -> scalar
      such as `pf_jax.obf(...)`.
    m: perturbation batch size; None means the whole per-device (micro-)batch. Smaller cuts
      it into chunks; larger spans m / per-device-batch devices (`chunking`).
    chunk_mode: one of CHUNK_MODES, when a device has several chunks.
    gsam_alpha: GSAM's xi >= 0; 0 is SAM.
    gsam_normalized_backup: GSAM decomposes the normalized d instead of g_p.
    asam: None, "before", "after" or "both".
    asam_eta: ASAM's eta >= 0 added to |theta|.
  """

  rho: ScalarOrSchedule
  objective: perturbations.Objective = "steepest"
  m: int | None = None
  chunk_mode: str = "auto"
  gsam_alpha: float = 0.0
  gsam_normalized_backup: bool = False
  asam: str | None = None
  asam_eta: float = 0.0

  def __post_init__(self):
    if isinstance(self.rho, (int, float)) and not self.rho >= 0:
      raise ArgumentError("SamSpec", "rho", f"rho must be >= 0 (or a schedule), got {self.rho}")
    if not callable(self.objective) and self.objective not in perturbations.OBJECTIVE_NAMES:
      raise ArgumentError(
        "SamSpec",
        "objective",
        f"objective must be a callable or one of {perturbations.OBJECTIVE_NAMES}, "
        f"got {self.objective!r}",
      )
    if self.m is not None and (not isinstance(self.m, int) or self.m < 1):
      raise ArgumentError("SamSpec", "m", f"m must be a positive int or None, got {self.m!r}")
    if self.chunk_mode not in CHUNK_MODES:
      raise ArgumentError(
        "SamSpec", "chunk_mode", f"chunk_mode must be one of {CHUNK_MODES}, got {self.chunk_mode!r}"
      )
    if not self.gsam_alpha >= 0:
      raise ArgumentError(
        "SamSpec", "gsam_alpha", f"gsam_alpha (xi) must be >= 0, got {self.gsam_alpha}"
      )
    if self.asam is not None and self.asam not in ASAM_MODES:
      raise ArgumentError(
        "SamSpec", "asam", f"asam must be None or one of {ASAM_MODES}, got {self.asam!r}"
      )
    if not self.asam_eta >= 0:
      raise ArgumentError("SamSpec", "asam_eta", f"asam_eta must be >= 0, got {self.asam_eta}")

  def rho_at(self, step) -> jax.Array:
    """rho_t: the schedule at `step`, or the constant."""
    if callable(self.rho):
      if step is None:
        raise ValueError("rho is a schedule: pass step=")
      return jnp.asarray(self.rho(step))
    return jnp.asarray(self.rho)


def chunking(m: int | None, local_batch: int, num_devices: int = 1) -> tuple[int, int]:
  """(chunks per device, devices per chunk): the one rule for m.

  m must divide the per-device batch, or be a multiple of it that spans a divisor of the
  devices; None is the per-device batch. Raises ValueError (message starts with "m=").
  """
  m = m or local_batch
  if m <= local_batch and local_batch % m == 0:
    return local_batch // m, 1
  group = m // local_batch
  if m > local_batch and m % local_batch == 0 and num_devices % group == 0:
    return 1, group
  raise ValueError(
    f"m={m} must divide the per-device batch {local_batch} or be a multiple of it spanning "
    f"a divisor of the {num_devices} device(s)"
  )


def _batch_size(batch) -> int:
  return jax.tree.leaves(batch)[0].shape[0]


def _split(batch, n: int):
  """[n, B / n, ...] for every leaf: n consecutive slices of the batch."""
  return jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch)


def _index(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def _logits(out, has_aux: bool):
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(f"with has_aux=True forward must return (logits, aux), got {type(out)}")
    return out[0]
  if isinstance(out, (tuple, list)):
    raise TypeError(
      f"forward returned a {type(out).__name__} of {len(out)}; it must return the logits array "
      "(pf_jax.perturbed_logits: logits only, e.g. the model in inference mode; "
      "sam and sam_value_and_grad: has_aux=True for (logits, aux))"
    )
  return out


def _perturb(spec, forward, loss_fn, has_aux, axis_name, group, params, rho, batch, key, g_p=None):
  """Steps 1-4 of the design page on one chunk: the perturbed parameters theta^p.

  The one place theta^p is computed: training (`_chunk_gradient`), the optax wrapper and the
  forgetting analysis (`perturbed_logits`) all call it. `g_p`, when given, is the chunk's ascent
  gradient computed by the caller (the pass at theta is then skipped). Returns (theta^p, g_p, d,
  logits at theta, aux at theta, task loss at theta, ||g_p||), with g_p after ASAM "before"
  scaling and d after "after" scaling; logits, aux and loss are None when g_p was given.
  """
  logits = aux = loss = None
  if g_p is None:
    if spec.objective == "random":  # the pass at theta only for the metric and BatchNorm stats
      out = forward(params, batch)
      g_p = optax.tree.random_like(key, params, jax.random.normal)  # shared within a group
    else:
      objective = loss_fn if spec.objective == "steepest" else spec.objective

      def at_theta(p):
        out = forward(p, batch)
        return objective(_logits(out, has_aux), batch), out

      (_, out), g_p = jax.value_and_grad(at_theta, has_aux=True)(params)
      g_p = sharding.group_mean(g_p, axis_name, group)
    logits = _logits(out, has_aux)
    aux = out[1] if has_aux else None
    loss = loss_fn(logits, batch)

  if spec.asam is not None:
    w = jax.tree.map(lambda x: jnp.abs(x) + spec.asam_eta, params)
  if spec.asam in ("before", "both"):
    g_p = jax.tree.map(jnp.multiply, w, g_p)
  ascent_norm = optax.tree.norm(g_p)
  d = optax.tree.scale(1.0 / (ascent_norm + EPS), g_p)
  if spec.asam in ("after", "both"):
    d = jax.tree.map(jnp.multiply, w, d)
  perturbed = jax.tree.map(lambda x, e: x + (rho * e).astype(x.dtype), params, d)
  return perturbed, g_p, d, logits, aux, loss, ascent_norm


def _chunk_gradient(
  spec, forward, loss_fn, has_aux, axis_name, group, params, rho, batch, key, g_p=None
):
  """Steps 1-6 of the design page on one chunk: (g, aux of the pass at theta, metrics)."""
  perturbed, g_p, d, _, aux, loss, ascent_norm = _perturb(
    spec, forward, loss_fn, has_aux, axis_name, group, params, rho, batch, key, g_p
  )
  task_loss = lambda p: loss_fn(_logits(forward(p, batch), has_aux), batch)
  perturbed_loss, g = jax.value_and_grad(task_loss)(perturbed)
  if spec.gsam_alpha:
    g = sharding.group_mean(g, axis_name, group)
    b = d if spec.gsam_normalized_backup else g_p
    u = optax.tree.scale(1.0 / (optax.tree.norm(g) + EPS), g)
    b_dot_u = optax.tree.vdot(b, u)
    g = jax.tree.map(lambda gi, bi, ui: gi - spec.gsam_alpha * (bi - b_dot_u * ui), g, b, u)
  metrics = dict(loss=loss, perturbed_loss=perturbed_loss, ascent_norm=ascent_norm, rho=rho)
  return g, aux, metrics


def _chunk_keys(rng, n_chunks: int, group: int, axis_name):
  """One key per chunk of the global batch; the devices of one group share their chunk's key."""
  device = 0 if axis_name is None else lax.axis_index(axis_name)
  key = jax.random.PRNGKey(0) if rng is None else rng
  first_chunk = device * n_chunks // group
  return jax.vmap(lambda i: jax.random.fold_in(key, first_chunk + i))(jnp.arange(n_chunks))


def chunk_strategy(mode: str, n_chunks: int, platform: str = "cpu") -> str:
  """The strategy `mode` runs with for `n_chunks` chunks per device ("auto" resolved for the
  devices' `platform`, e.g. "cpu", "tpu", "gpu": `AUTO_RULES`)."""
  if mode != "auto":
    return mode
  most = AUTO_RULES.get(platform, MAX_UNROLLED_CHUNKS)
  return "unroll" if n_chunks <= most else "scan"


def _platform() -> str:
  """The platform being traced for: that of the enclosing shard_map's mesh (a TPU topology's
  compile-only devices included), else JAX's default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def _mean_over(fn, xs, n: int, mode: str):
  """mean_i fn(xs[i]) over the n leading slices of `xs`, computed as `mode` says."""
  mode = chunk_strategy(mode, n, _platform()) if mode == "auto" else mode
  if n == 1:
    return fn(_index(xs, 0))
  if mode == "vmap":
    return jax.tree.map(lambda a: jnp.mean(a, axis=0), jax.vmap(fn)(xs))
  if mode == "unroll":
    outs = [fn(_index(xs, i)) for i in range(n)]
    return jax.tree.map(lambda *a: sum(a) / n, *outs)
  first = fn(_index(xs, 0))  # scan: the carry starts from chunk 0 (types match the body's)
  body = lambda total, x: (jax.tree.map(lambda a, b: a + b, total, fn(x)), None)
  total, _ = lax.scan(body, first, jax.tree.map(lambda a: a[1:], xs))
  return jax.tree.map(lambda a: a / n, total)


def sam_value_and_grad(
  forward: Forward,
  loss_fn: LossFn,
  spec: SamSpec | None,
  *,
  has_aux: bool = False,
  axis_name: sharding.AxisName | None = None,
  accum_steps: int = 1,
):
  """The SAM-family analogue of `jax.value_and_grad(loss, has_aux)`, for every method.

  Args:
    forward: (params, batch) -> logits, or (logits, aux) with `has_aux`. With BatchNorm make
      aux the new batch statistics: the returned aux is that of the pass at theta (averaged over
      chunks, micro-batches and devices); the perturbed pass's aux is discarded.
    loss_fn: task loss (logits, batch) -> scalar mean, e.g. `pf_jax.softmax_cross_entropy`.
    spec: the method (`SamSpec`); None is the plain gradient of the task loss.
    has_aux: see `forward`.
    axis_name: the mesh/pmap axis of data parallelism (call inside shard_map/pmap); results are
      averaged over it. Each device perturbs with its own chunks (its own gradient, not the
      average: parameters are cast to device-varying first).
    accum_steps: the batch is cut into this many micro-batches, computed one after another
      (gradient accumulation); each is cut into its own m-chunks.

  Returns:
    fn(params, batch, *, step=None, rng=None) -> ((loss, aux, metrics), grads): `step` picks
    rho_t of a schedule; `rng` is this step's PRNG key (required by objective="random": each
    chunk folds in its global index, micro-batch i first folds in i). loss is the task loss at
    theta; metrics = {loss, perturbed_loss, ascent_norm, rho} ({loss} without spec).
  """
  if not isinstance(accum_steps, int) or accum_steps < 1:
    raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
  loss_fn = _checked_loss(loss_fn, "pf_jax.sam_value_and_grad")

  def micro(params, batch, rho, key, num_devices):
    if spec is None:

      def at_theta(p):
        out = forward(p, batch)
        return loss_fn(_logits(out, has_aux), batch), out

      (loss, out), grads = jax.value_and_grad(at_theta, has_aux=True)(params)
      return grads, (out[1] if has_aux else None), {"loss": loss}
    n_chunks, group = chunking(spec.m, _batch_size(batch), num_devices)
    keys = _chunk_keys(key, n_chunks, group, axis_name)
    one = lambda chunk: _chunk_gradient(
      spec, forward, loss_fn, has_aux, axis_name, group, params, rho, chunk[0], chunk[1]
    )
    return _mean_over(one, (_split(batch, n_chunks), keys), n_chunks, spec.chunk_mode)

  def fn(params, batch, *, step=None, rng=None):
    rho = None
    if spec is not None:
      rho = spec.rho_at(step)
      if spec.objective == "random" and rng is None:
        raise ValueError("objective='random' needs rng= (a PRNG key)")
    num_devices = 1 if axis_name is None else sharding.axis_size(axis_name)
    if _batch_size(batch) % accum_steps:
      raise ValueError(
        f"accum_steps={accum_steps} must divide the per-device batch {_batch_size(batch)}"
      )
    if axis_name is not None:
      params = sharding.per_device(params, axis_name)
    if accum_steps == 1:
      grads, aux, metrics = micro(params, batch, rho, rng, num_devices)
    else:
      keys = None
      if rng is not None:
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(accum_steps))
      one = lambda x: micro(params, x[0], rho, x[1], num_devices)
      grads, aux, metrics = _mean_over(one, (_split(batch, accum_steps), keys), accum_steps, "scan")
    if axis_name is not None:
      grads, aux, metrics = lax.pmean((grads, aux, metrics), axis_name)
    return (metrics["loss"], aux, metrics), grads

  return fn


def perturbed_logits(
  forward: Forward,
  loss_fn: LossFn,
  spec: SamSpec,
  params,
  batch,
  *,
  step=None,
  rng=None,
  axis_name: sharding.AxisName | None = None,
):
  """Logits at theta and at the perturbed parameters theta^p of each example's own m-chunk.

  theta^p is what a training step with `spec` on this batch would perturb to (steps 1-4 of the
  module docstring, the same `_perturb` as training; GSAM changes the update gradient, not
  theta^p). For the forgetting analysis (pf_jax.analysis, paper Section 6.1). `forward` returns
  logits only (e.g. a model in inference mode). Chunks run one after another (`lax.map`).

  Returns:
    (logits at theta, logits at theta^p), each [local batch, ...] in the order of the batch.
  """
  loss_fn = _checked_loss(loss_fn, "pf_jax.perturbed_logits")
  local_batch = _batch_size(batch)
  num_devices = 1 if axis_name is None else sharding.axis_size(axis_name)
  n_chunks, group = chunking(spec.m, local_batch, num_devices)
  keys = _chunk_keys(rng, n_chunks, group, axis_name)
  rho = spec.rho_at(step)
  if axis_name is not None:
    params = sharding.per_device(params, axis_name)

  def one(chunk):
    b, k = chunk
    perturbed, _, _, logits, _, _, _ = _perturb(
      spec, forward, loss_fn, False, axis_name, group, params, rho, b, k
    )
    return logits, forward(perturbed, b)

  clean, perturbed = lax.map(one, (_split(batch, n_chunks), keys))
  merge = lambda a: a.reshape((local_batch,) + a.shape[2:])
  return merge(clean), merge(perturbed)


class SamState(NamedTuple):
  """State of `sam`: only what must persist between steps."""

  count: jax.Array  # steps taken: the `step` of a rho schedule
  base_state: optax.OptState  # the base optimizer's state


UPDATE_HELP = (
  "pf_jax.sam's update needs forward= and batch=: call "
  "tx.update(grads, opt_state, params, forward=forward, batch=batch), or with Flax use "
  "pf_jax.TrainState and state.apply_gradients(grads=grads, forward=forward, batch=batch)"
)


def sam(
  base: optax.GradientTransformation,
  spec: SamSpec,
  loss_fn: LossFn | None = None,
  *,
  has_aux: bool = False,
  axis_name: sharding.AxisName | None = None,
  updates_are_ascent: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `base` (any optax optimizer) so that it steps with the SAM-family gradient of `spec`.

  Args:
    base: the optimizer that steps with the final averaged SAM gradient (chain clipping,
      weight decay etc. inside it).
    spec: the method (`SamSpec`).
    loss_fn: required, the task loss (logits, batch) -> scalar mean that is minimized, e.g.
      `pf_jax.softmax_cross_entropy`; the same one your `updates` are the gradient of.
    has_aux, axis_name: as in `sam_value_and_grad`.
    updates_are_ascent: None decides from the method and, under shard_map, from the type of
      `updates` (device-varying: this device's own gradient; invariant: already averaged, not
      reusable). Under pmap types cannot tell: pass True when `updates` are each device's own
      gradient before any pmean.

  Returns:
    A transformation whose `update(updates, state, params, *, forward, batch, rng=None,
    **extra)` takes `updates`, the caller's gradient of `loss_fn` at `params` on `batch`. For
    steepest ascent with one chunk per device it *is* the ascent gradient g_p, so only the
    perturbed pass is added (two forward+backward passes per step in all); otherwise the
    gradient is computed by `sam_value_and_grad` (and `updates` ignored). `forward` and `rng`
    are as in `sam_value_and_grad`; rho_t follows the state's step count.

  Example:
    >>> tx = pf_jax.sam(optax.sgd(0.1), pf_jax.SamSpec(rho=0.05), pf_jax.softmax_cross_entropy)
    >>> updates, opt_state = tx.update(grads, opt_state, params, forward=forward, batch=batch)
  """
  if not isinstance(spec, SamSpec):
    raise TypeError(f"pf_jax.sam(base, spec, loss_fn): spec must be a pf_jax.SamSpec, got {spec!r}")
  loss_fn = _checked_loss(loss_fn, "pf_jax.sam(base, spec, loss_fn)")
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    return SamState(jnp.zeros((), jnp.int32), base.init(params))

  def update_fn(updates, state, params=None, *, forward=None, batch=None, rng=None, **extra):
    if params is None:
      raise ValueError("pf_jax.sam's update needs params")
    if forward is None or batch is None:
      raise TypeError(UPDATE_HELP)
    if "loss_fn" in extra:
      raise TypeError(
        "pf_jax.sam's update takes no loss_fn: the task loss is set once, "
        "pf_jax.sam(base, spec, loss_fn)"
      )
    num_devices = 1 if axis_name is None else sharding.axis_size(axis_name)
    n_chunks, group = chunking(spec.m, _batch_size(batch), num_devices)
    reuse = updates_are_ascent
    if reuse is None:
      reuse = updates is not None and (axis_name is None or sharding.is_varying(updates, axis_name))
    if reuse and spec.objective == "steepest" and n_chunks == 1 and group == 1:
      rho = spec.rho_at(state.count)
      p = params if axis_name is None else sharding.per_device(params, axis_name)
      g_p = jax.tree.map(lambda u, x: u.astype(x.dtype), updates, p)
      grads, _, _ = _chunk_gradient(
        spec, forward, loss_fn, has_aux, axis_name, 1, p, rho, batch, None, g_p
      )
      if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    else:
      grad_fn = sam_value_and_grad(forward, loss_fn, spec, has_aux=has_aux, axis_name=axis_name)
      _, grads = grad_fn(params, batch, step=state.count, rng=rng)
    new_updates, base_state = base.update(grads, state.base_state, params, **extra)
    return new_updates, SamState(optax.safe_increment(state.count), base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
