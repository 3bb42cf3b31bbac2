"""Same global batch, same update: 1 device vs 8 simulated devices (shard_map and pmap)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pf_jax

C = 4


def apply_fn(p, x):
  return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def make_problem(batch):
  rng = np.random.default_rng(0)
  params = {
    "W1": rng.normal(size=(5, 16)) / 2,
    "b1": np.zeros(16),
    "W2": rng.normal(size=(16, C)) / 4,
    "b2": np.zeros(C),
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, size=batch))
  return params, x, y


CASES = [
  # (id, global batch, devices, kwargs)
  ("m_eq_shard", 32, 8, dict(m=4)),
  ("m_lt_shard_vmap", 32, 8, dict(m=2, chunk_mode="vmap")),
  ("m_lt_shard_scan", 32, 8, dict(m=2, chunk_mode="scan")),
  ("m_spans_2", 32, 8, dict(m=8)),
  (
    "m_spans_4_gsam_obf",
    32,
    8,
    dict(m=16, gsam_alpha=0.3, objective=pf_jax.obf(0.25, 1.0, "softmax")),
  ),
  ("m_spans_3_ring", 24, 6, dict(m=12, gsam_alpha=0.2, gsam_normalized_backup=True)),
  ("random_m_lt_shard", 32, 8, dict(m=2, objective="random")),
  ("random_m_spans_2", 32, 8, dict(m=8, objective="random")),
  ("asam_gsam_m_eq_shard", 32, 8, dict(m=4, asam="both", gsam_alpha=0.1)),
]


def forward(p, batch):
  return apply_fn(p, batch[0])


def grad_fn(kw, axis_name=None):
  """(params, x, y) -> the SAM-family gradient through the public functional core."""
  spec = pf_jax.SamSpec(rho=0.5, **kw)
  fn = pf_jax.sam_value_and_grad(forward, pf_jax.sigmoid_cross_entropy, spec, axis_name=axis_name)
  return lambda p, x, y: fn(p, (x, y), rng=jax.random.PRNGKey(3))[1]


def single_device(params, x, y, kw):
  return jax.jit(grad_fn(kw))(params, x, y)


def assert_trees_close(a, b, tol=1e-5):
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=tol, atol=tol)


def on_mesh(mesh, *args_and_specs):
  return [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in args_and_specs]


@pytest.mark.parametrize("name,batch,n_dev,kw", CASES, ids=[c[0] for c in CASES])
def test_shard_map_matches_one_device(name, batch, n_dev, kw):
  params, x, y = make_problem(batch)
  want = single_device(params, x, y, kw)
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
  sharded = jax.jit(
    jax.shard_map(
      grad_fn(kw, "data"), mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
    )
  )
  got = sharded(*on_mesh(mesh, (params, P()), (x, P("data")), (y, P("data"))))
  assert_trees_close(got, want)


@pytest.mark.parametrize(
  "name,batch,n_dev,kw", [c for c in CASES if c[2] == 8], ids=[c[0] for c in CASES if c[2] == 8]
)
def test_pmap_matches_one_device(name, batch, n_dev, kw):
  params, x, y = make_problem(batch)
  want = single_device(params, x, y, kw)
  pmapped = jax.pmap(grad_fn(kw, "batch"), axis_name="batch", in_axes=(None, 0, 0))
  got = pmapped(params, x.reshape(8, -1, 5), y.reshape(8, -1))
  for k in got:  # every device holds the same averaged gradient
    np.testing.assert_array_equal(got[k][0], got[k][7])
  assert_trees_close(jax.tree.map(lambda a: a[0], got), want)


def test_random_directions_differ_per_device():
  """8 devices, one chunk each: the mean of the 8 unit directions has squared norm ~1/8."""
  dim, rho = 4096, 0.5
  w = {"w": jnp.asarray(np.random.default_rng(0).normal(size=dim), jnp.float32)}
  fn = lambda p, b: jnp.broadcast_to(p["w"], (b[0].shape[0], dim))
  loss = lambda z, b: 0.5 * jnp.mean(jnp.sum(z**2, -1))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  spec = pf_jax.SamSpec(rho=rho, objective="random")
  vg = pf_jax.sam_value_and_grad(fn, loss, spec, axis_name="data")
  grad = jax.jit(
    jax.shard_map(
      lambda p, x, y: vg(p, (x, y), rng=jax.random.PRNGKey(0))[1],
      mesh=mesh,
      in_specs=(P(), P("data"), P("data")),
      out_specs=P(),
    )
  )
  args = on_mesh(
    mesh, (w, P()), (jnp.zeros((16, 1)), P("data")), (jnp.zeros(16, jnp.int32), P("data"))
  )
  d = (grad(*args)["w"] - w["w"]) / rho
  assert float(jnp.sum(d**2)) == pytest.approx(1 / 8, abs=0.03)


def _run(tx, step, params, x, y):
  state = tx.init(params)
  for _ in range(3):
    upd, state = step(state, params, x, y)
    params = optax.apply_updates(params, upd)
  return params


BASE = optax.chain(optax.clip_by_global_norm(0.1), pf_jax.adamw(1e-2, weight_decay=0.3))


@pytest.mark.parametrize(
  "spec_kw",
  [dict(objective=pf_jax.obf(0.25, 1.0, "softmax"), m=4), dict()],
  ids=["obf_m4", "steepest_reuse"],
)
def test_optax_transformation_under_shard_map_matches_one_device(spec_kw):
  """8 devices with their own (device-varying) gradient as `updates` = one device with m = 4."""
  params, x, y = make_problem(32)
  loss_fn = pf_jax.softmax_cross_entropy
  local_grad = lambda p, x, y: jax.grad(lambda q: loss_fn(forward(q, (x, y)), y))(p)
  spec = pf_jax.SamSpec(rho=0.3, **dict(spec_kw, m=4))
  tx1 = pf_jax.sam(BASE, spec, loss_fn)
  one = _run(
    tx1,
    jax.jit(
      lambda s, p, x, y: tx1.update(local_grad(p, x, y), s, p, forward=forward, batch=(x, y))
    ),
    params,
    x,
    y,
  )
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx8 = pf_jax.sam(BASE, pf_jax.SamSpec(rho=0.3, **spec_kw), loss_fn, axis_name="data")
  traces, steps = [], []

  def counting_forward(p, batch):
    traces.append(1)
    return forward(p, batch)

  def step(s, p, x, y):
    steps.append(1)
    g = local_grad(jax.lax.pcast(p, "data", to="varying"), x, y)  # this device's own gradient
    return tx8.update(g, s, p, forward=counting_forward, batch=(x, y))

  step8 = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P()))
  )
  eight = _run(tx8, step8, *on_mesh(mesh, (params, P()), (x, P("data")), (y, P("data"))))
  assert_trees_close(eight, one)
  # Steepest: only the perturbed pass is added to the caller's (per trace of the step).
  assert len(traces) == (1 if spec_kw == {} else 2) * len(steps)
  assert not np.allclose(one["W1"], params["W1"])


def test_optax_transformation_under_pmap_reuses_declared_gradient():
  params, x, y = make_problem(32)
  loss_fn = pf_jax.softmax_cross_entropy
  spec = pf_jax.SamSpec(rho=0.3)
  tx1 = pf_jax.sam(BASE, pf_jax.SamSpec(rho=0.3, m=4), loss_fn)
  one = _run(
    tx1,
    jax.jit(lambda s, p, x, y: tx1.update(None, s, p, forward=forward, batch=(x, y))),
    params,
    x,
    y,
  )
  tx8 = pf_jax.sam(BASE, spec, loss_fn, axis_name="batch", updates_are_ascent=True)

  def step(s, p, x, y):
    g = jax.grad(lambda q: loss_fn(forward(q, (x, y)), y))(p)  # per device, not averaged
    return tx8.update(g, s, p, forward=forward, batch=(x, y))

  pstep = jax.pmap(step, axis_name="batch", in_axes=(None, None, 0, 0), out_axes=None)
  eight = _run(tx8, pstep, params, x.reshape(8, -1, 5), y.reshape(8, -1))
  assert_trees_close(eight, one)
