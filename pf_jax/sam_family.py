"""The SAM family (SAM, m-SAM, GSAM, ASAM, random, OBF) as one gradient computation.

`sam_gradient` is the computation (gradient out, for users writing their own step, e.g. with
BatchNorm state); `sam` wraps it and any base optax optimizer into an
`optax.GradientTransformationExtraArgs`. Both share `SamSpec` and `spec_gradient`;
`perturbed_logits` (the forgetting analysis) shares `_perturb`, the one computation of theta^p.

Per m-sized chunk S (see docs/sam-family.md):
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

from pf_jax import perturbations
from pf_jax import sharding
from pf_jax.schedules import ScalarOrSchedule

EPS = 1e-12
ASAM_MODES = ("before", "after", "both")
CHUNK_MODES = ("vmap", "scan")
METRIC_NAMES = ("loss", "perturbed_loss", "ascent_norm", "rho")

ApplyFn = Callable[[Any, Any], Any]  # (params, inputs) -> logits, or (logits, aux) if has_aux
LossFn = Callable[[jax.Array, jax.Array], jax.Array]  # (logits, labels) -> scalar mean loss


@dataclasses.dataclass(frozen=True)
class SamSpec:
  """Hyperparameters of one member of the SAM family, validated on construction.

  Attributes:
    rho: perturbation radius, a float >= 0 or a schedule step -> rho_t.
    objective: "steepest" (task loss), "random", or a callable (logits, labels) -> scalar
      such as `pf_jax.obf(...)`.
    m: perturbation batch size; None means the whole per-device batch. Smaller than the
      per-device batch cuts it into chunks; larger spans m / per-device-batch devices.
    chunk_mode: "vmap" computes a device's chunks together, "scan" one after another
      (memory of one chunk). Measured: vmap is ~free for transformers; for convnets on GPU
      scan is faster (per-chunk weights make vmapped convolutions grouped); on CPU use vmap.
    gsam_alpha: GSAM's xi >= 0; 0 is SAM.
    gsam_normalized_backup: GSAM decomposes the normalized d instead of g_p.
    asam: None, "before", "after" or "both".
    asam_eta: ASAM's eta >= 0 added to |theta|.
    axis_name: named mesh/pmap axis to average over devices; None on one device.
  """

  rho: ScalarOrSchedule
  objective: perturbations.Objective = "steepest"
  m: int | None = None
  chunk_mode: str = "vmap"
  gsam_alpha: float = 0.0
  gsam_normalized_backup: bool = False
  asam: str | None = None
  asam_eta: float = 0.0
  axis_name: Any = None

  def __post_init__(self):
    if isinstance(self.rho, (int, float)) and not self.rho >= 0:
      raise ValueError(f"rho must be >= 0 (or a schedule), got {self.rho}")
    if not callable(self.objective) and self.objective not in perturbations.OBJECTIVE_NAMES:
      raise ValueError(
        f"objective must be a callable or one of {perturbations.OBJECTIVE_NAMES}, "
        f"got {self.objective!r}"
      )
    if self.m is not None and (not isinstance(self.m, int) or self.m < 1):
      raise ValueError(f"m must be a positive int or None, got {self.m!r}")
    if self.chunk_mode not in CHUNK_MODES:
      raise ValueError(f"chunk_mode must be one of {CHUNK_MODES}, got {self.chunk_mode!r}")
    if not self.gsam_alpha >= 0:
      raise ValueError(f"gsam_alpha (xi) must be >= 0, got {self.gsam_alpha}")
    if self.asam is not None and self.asam not in ASAM_MODES:
      raise ValueError(f"asam must be None or one of {ASAM_MODES}, got {self.asam!r}")
    if not self.asam_eta >= 0:
      raise ValueError(f"asam_eta must be >= 0, got {self.asam_eta}")

  def rho_at(self, step) -> jax.Array:
    return jnp.asarray(self.rho(step) if callable(self.rho) else self.rho)


def _dot(a, b) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _norm(tree) -> jax.Array:
  return jnp.sqrt(_dot(tree, tree))


def _scale(tree, c):
  return jax.tree.map(lambda x: (c * x).astype(x.dtype), tree)


def _chunking(spec: SamSpec, local_batch: int) -> tuple[int, int]:
  """(chunks per device, devices per chunk) for this per-device batch, or a ValueError."""
  m = spec.m or local_batch
  if m <= local_batch:
    if local_batch % m:
      raise ValueError(
        f"m={m} must divide the per-device batch {local_batch} (or be a multiple of it)"
      )
    return local_batch // m, 1
  if m % local_batch:
    raise ValueError(
      f"m={m} must be a multiple of the per-device batch {local_batch} (or divide it)"
    )
  if spec.axis_name is None:
    raise ValueError(
      f"m={m} exceeds the batch {local_batch} and there is no axis_name to span devices"
    )
  return 1, m // local_batch


def _perturb(
  spec: SamSpec, apply_fn, loss_fn, has_aux, params, rho, inputs, labels, key, group_size
):
  """Steps 1-4 of the design page on one chunk: the perturbed parameters theta^p.

  The one place theta^p is computed: training (`_chunk_gradient`) and the forgetting analysis
  (`perturbed_logits`) both call it. Returns (theta^p, g_p, d, logits at theta, aux at theta,
  task loss at theta, ||g_p||), with g_p after ASAM "before" scaling and d after "after" scaling.
  """
  group = lambda t: sharding.group_mean(t, spec.axis_name, group_size)

  def forward(p, objective):
    out = apply_fn(p, inputs)
    logits, aux = out if has_aux else (out, None)
    return objective(logits, labels), (logits, aux)

  if spec.objective == "random":
    _, (logits, aux) = forward(params, loss_fn)  # for the metric and BatchNorm statistics only
    g_p = optax.tree.random_like(key, params, jax.random.normal)  # same key within a device group
  else:
    objective = loss_fn if spec.objective == "steepest" else spec.objective
    (_, (logits, aux)), g_p = jax.value_and_grad(forward, has_aux=True)(params, objective)
    g_p = group(g_p)
  loss = loss_fn(logits, labels)

  w = None
  if spec.asam is not None:
    w = jax.tree.map(lambda x: jnp.abs(x) + spec.asam_eta, params)
  if spec.asam in ("before", "both"):
    g_p = jax.tree.map(jnp.multiply, w, g_p)
  ascent_norm = _norm(g_p)
  d = _scale(g_p, 1.0 / (ascent_norm + EPS))
  if spec.asam in ("after", "both"):
    d = jax.tree.map(jnp.multiply, w, d)
  perturbed = jax.tree.map(lambda x, e: x + (rho * e).astype(x.dtype), params, d)
  return perturbed, g_p, d, logits, aux, loss, ascent_norm


def _chunk_gradient(
  spec: SamSpec, apply_fn, loss_fn, has_aux, params, rho, inputs, labels, key, group_size
):
  """Steps 1-6 of the design page on one chunk; returns (g, aux of the first pass, metrics)."""
  perturbed, g_p, d, _, aux, loss, ascent_norm = _perturb(
    spec, apply_fn, loss_fn, has_aux, params, rho, inputs, labels, key, group_size
  )

  def task_loss(p):
    out = apply_fn(p, inputs)
    return loss_fn(out[0] if has_aux else out, labels)

  perturbed_loss, g = jax.value_and_grad(task_loss)(perturbed)

  if spec.gsam_alpha:
    g = sharding.group_mean(g, spec.axis_name, group_size)
    b = d if spec.gsam_normalized_backup else g_p
    u = _scale(g, 1.0 / (_norm(g) + EPS))
    b_dot_u = _dot(b, u)
    g = jax.tree.map(lambda gi, bi, ui: gi - spec.gsam_alpha * (bi - b_dot_u * ui), g, b, u)

  metrics = dict(loss=loss, perturbed_loss=perturbed_loss, ascent_norm=ascent_norm, rho=rho)
  return g, aux, metrics


def _mean0(tree):
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _chunk_keys(spec: SamSpec, rng, n_chunks: int, group_size: int):
  """One key per chunk of the global batch; devices of one group share their chunk's key."""
  device = 0 if spec.axis_name is None else lax.axis_index(spec.axis_name)
  key = jax.random.PRNGKey(0) if rng is None else rng
  first_chunk = device * n_chunks // group_size
  return jax.vmap(lambda i: jax.random.fold_in(key, first_chunk + i))(jnp.arange(n_chunks))


def spec_gradient(
  spec: SamSpec,
  params,
  inputs,
  labels,
  *,
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  rho,
  rng=None,
  has_aux: bool = False,
):
  """`sam_gradient` for a validated `SamSpec` and this step's rho: (grads, aux, metrics)."""
  local_batch = jax.tree.leaves(labels)[0].shape[0]
  n_chunks, group_size = _chunking(spec, local_batch)
  if spec.objective == "random" and rng is None:
    raise ValueError("objective='random' needs rng (a PRNG key)")
  keys = _chunk_keys(spec, rng, n_chunks, group_size)
  if spec.axis_name is not None:
    params = sharding.per_device(params, spec.axis_name)

  def one(x, y, k):
    return _chunk_gradient(spec, apply_fn, loss_fn, has_aux, params, rho, x, y, k, group_size)

  if n_chunks == 1:
    g, aux, metrics = one(inputs, labels, keys[0])
  else:
    xs, ys = _split_chunks((inputs, labels), n_chunks)
    if spec.chunk_mode == "vmap":
      g, aux, metrics = _mean0(jax.vmap(one)(xs, ys, keys))
    else:

      def body(total, chunk):
        out = one(*chunk)
        return jax.tree.map(lambda a, b: a + b / n_chunks, total, out), None

      zeros = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(one, *jax.tree.map(lambda a: a[0], (xs, ys, keys)))
      )
      (g, aux, metrics), _ = lax.scan(body, zeros, (xs, ys, keys))

  if spec.axis_name is not None:
    g, aux, metrics = lax.pmean((g, aux, metrics), spec.axis_name)
  return g, aux, metrics


def _split_chunks(tree, n_chunks: int):
  return jax.tree.map(lambda a: a.reshape((n_chunks, -1) + a.shape[1:]), tree)


def perturbed_logits(
  spec: SamSpec, params, inputs, labels, *, apply_fn: ApplyFn, loss_fn: LossFn, rho, rng=None
):
  """Logits at theta and at the perturbed parameters theta^p of each example's own m-chunk.

  theta^p is what a training step with `spec` on this batch would perturb to (steps 1-4 of the
  module docstring, computed by the same `_perturb` as training; GSAM only changes the update
  gradient, not theta^p). For the forgetting analysis (pf_jax.analysis, paper Section 6.1).
  `apply_fn` returns logits only (e.g. a model in inference mode). Chunks are processed one
  after another (`lax.map`), so memory is that of one chunk whatever `spec.chunk_mode` says.

  Returns:
    (logits at theta, logits at theta^p), each [local batch, ...] in the order of `inputs`.
  """
  local_batch = jax.tree.leaves(labels)[0].shape[0]
  n_chunks, group_size = _chunking(spec, local_batch)
  keys = _chunk_keys(spec, rng, n_chunks, group_size)
  if spec.axis_name is not None:
    params = sharding.per_device(params, spec.axis_name)

  def one(chunk):
    x, y, k = chunk
    perturbed, _, _, logits, _, _, _ = _perturb(
      spec, apply_fn, loss_fn, False, params, rho, x, y, k, group_size
    )
    return logits, apply_fn(perturbed, x)

  xs, ys = _split_chunks((inputs, labels), n_chunks)
  clean, perturbed = lax.map(one, (xs, ys, keys))
  merge = lambda a: a.reshape((local_batch,) + a.shape[2:])
  return merge(clean), merge(perturbed)


def sam_gradient(
  params,
  inputs,
  labels,
  *,
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  rho: float,
  objective: perturbations.Objective = "steepest",
  m: int | None = None,
  chunk_mode: str = "vmap",
  gsam_alpha: float = 0.0,
  gsam_normalized_backup: bool = False,
  asam: str | None = None,
  asam_eta: float = 0.0,
  axis_name=None,
  rng: jax.Array | None = None,
  has_aux: bool = False,
):
  """The SAM-family update gradient of this step (module docstring), averaged over devices.

  Args:
    params: parameters theta (any pytree).
    inputs, labels: this device's batch (pytrees with a leading batch axis; labels are ints).
    apply_fn: (params, inputs) -> logits, or (logits, aux) with `has_aux=True`. With BatchNorm,
      make aux the new batch statistics: the returned aux comes from the unperturbed pass
      only (averaged over chunks and devices); the perturbed pass's aux is discarded.
    loss_fn: task loss (logits, labels) -> scalar mean, e.g. `pf_jax.softmax_cross_entropy`.
    rho: this step's radius, a number >= 0 or a traced scalar (evaluate schedules yourself).
    rng: PRNG key of this step; required for objective="random", each chunk folds in its
      global index so chunks, devices and steps differ reproducibly.
    Other arguments: see `SamSpec`.

  Returns:
    (grads, aux, metrics): grads to hand to the base optimizer; aux of the first pass (None
    without has_aux); metrics dict with loss (at theta), perturbed_loss, ascent_norm, rho.
  """
  if callable(rho):
    raise ValueError("sam_gradient takes this step's rho as a number: pass rho=schedule(step)")
  spec = SamSpec(
    rho=rho,
    objective=objective,
    m=m,
    chunk_mode=chunk_mode,
    gsam_alpha=gsam_alpha,
    gsam_normalized_backup=gsam_normalized_backup,
    asam=asam,
    asam_eta=asam_eta,
    axis_name=axis_name,
  )
  return spec_gradient(
    spec,
    params,
    inputs,
    labels,
    apply_fn=apply_fn,
    loss_fn=loss_fn,
    rho=spec.rho_at(0),
    rng=rng,
    has_aux=has_aux,
  )


class SamState(NamedTuple):
  count: jax.Array  # steps taken; drives the rho schedule and the random key
  key: jax.Array  # base PRNG key for random perturbations
  base_state: optax.OptState
  metrics: dict  # metrics of the last step, for logging


def sam(
  base: optax.GradientTransformation,
  rho: ScalarOrSchedule,
  *,
  apply_fn: ApplyFn,
  loss_fn: LossFn,
  objective: perturbations.Objective = "steepest",
  m: int | None = None,
  chunk_mode: str = "vmap",
  gsam_alpha: float = 0.0,
  gsam_normalized_backup: bool = False,
  asam: str | None = None,
  asam_eta: float = 0.0,
  axis_name=None,
  seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `base` (any optax optimizer) so its gradient is the SAM-family gradient.

  `update(updates, state, params, *, inputs, labels, **extra)` recomputes the gradient from
  the batch with `sam_gradient` (the incoming `updates` are ignored and may be None), then
  calls `base.update` on it: clipping, AdamW or SGDW in `base` see the final averaged SAM
  gradient. rho may be a schedule of the step count. Call it inside shard_map/pmap with
  `axis_name` set for data parallelism. Use `sam_gradient` directly for models with
  BatchNorm state. Arguments: see `SamSpec`.
  """
  spec = SamSpec(
    rho=rho,
    objective=objective,
    m=m,
    chunk_mode=chunk_mode,
    gsam_alpha=gsam_alpha,
    gsam_normalized_backup=gsam_normalized_backup,
    asam=asam,
    asam_eta=asam_eta,
    axis_name=axis_name,
  )
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    metrics = {k: jnp.zeros((), jnp.float32) for k in METRIC_NAMES}
    return SamState(jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed), base.init(params), metrics)

  def update_fn(updates, state, params=None, *, inputs=None, labels=None, **extra):
    del updates
    if params is None or inputs is None or labels is None:
      raise ValueError("sam's update needs params, inputs= and labels=")
    grads, _, metrics = spec_gradient(
      spec,
      params,
      inputs,
      labels,
      apply_fn=apply_fn,
      loss_fn=loss_fn,
      rho=spec.rho_at(state.count),
      rng=jax.random.fold_in(state.key, state.count),
    )
    new_updates, base_state = base.update(grads, state.base_state, params, **extra)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return new_updates, SamState(optax.safe_increment(state.count), state.key, base_state, metrics)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
