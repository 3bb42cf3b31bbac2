"""Same global batch, same update: 1 device vs 8 simulated devices (shard_map and pmap)."""

import functools

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
  ("m_spans_4_gsam_obf", 32, 8, dict(m=16, gsam_alpha=0.3, objective=pf_jax.obf(0.25))),
  ("m_spans_3_ring", 24, 6, dict(m=12, gsam_alpha=0.2, gsam_normalized_backup=True)),
  ("random_m_lt_shard", 32, 8, dict(m=2, objective="random")),
  ("random_m_spans_2", 32, 8, dict(m=8, objective="random")),
  ("asam_gsam_m_eq_shard", 32, 8, dict(m=4, asam="both", gsam_alpha=0.1)),
]


def single_device(params, x, y, kw):
  fn = functools.partial(
    pf_jax.sam_gradient,
    apply_fn=apply_fn,
    loss_fn=pf_jax.sigmoid_cross_entropy,
    rho=0.5,
    rng=jax.random.PRNGKey(3),
    **kw,
  )
  return jax.jit(fn)(params, x, y)[0]


def assert_trees_close(a, b, tol=1e-5):
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=tol, atol=tol)


@pytest.mark.parametrize("name,batch,n_dev,kw", CASES, ids=[c[0] for c in CASES])
def test_shard_map_matches_one_device(name, batch, n_dev, kw):
  params, x, y = make_problem(batch)
  want = single_device(params, x, y, kw)
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
  fn = functools.partial(
    pf_jax.sam_gradient,
    apply_fn=apply_fn,
    loss_fn=pf_jax.sigmoid_cross_entropy,
    rho=0.5,
    rng=jax.random.PRNGKey(3),
    axis_name="data",
    **kw,
  )
  sharded = jax.jit(
    jax.shard_map(
      lambda p, x, y: fn(p, x, y)[0], mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
    )
  )
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  got = sharded(put(params, P()), put(x, P("data")), put(y, P("data")))
  assert_trees_close(got, want)


@pytest.mark.parametrize(
  "name,batch,n_dev,kw", [c for c in CASES if c[2] == 8], ids=[c[0] for c in CASES if c[2] == 8]
)
def test_pmap_matches_one_device(name, batch, n_dev, kw):
  params, x, y = make_problem(batch)
  want = single_device(params, x, y, kw)
  fn = functools.partial(
    pf_jax.sam_gradient,
    apply_fn=apply_fn,
    loss_fn=pf_jax.sigmoid_cross_entropy,
    rho=0.5,
    rng=jax.random.PRNGKey(3),
    axis_name="batch",
    **kw,
  )
  pmapped = jax.pmap(lambda p, x, y: fn(p, x, y)[0], axis_name="batch", in_axes=(None, 0, 0))
  got = pmapped(params, x.reshape(8, -1, 5), y.reshape(8, -1))
  for k in got:  # every device holds the same averaged gradient
    np.testing.assert_array_equal(got[k][0], got[k][7])
  assert_trees_close(jax.tree.map(lambda a: a[0], got), want)


def test_random_directions_differ_per_device():
  """8 devices, one chunk each: the mean of the 8 unit directions has squared norm ~1/8."""
  dim, rho = 4096, 0.5
  w = {"w": jnp.asarray(np.random.default_rng(0).normal(size=dim), jnp.float32)}
  fn = lambda p, x: jnp.broadcast_to(p["w"], (x.shape[0], dim))
  loss = lambda z, y: 0.5 * jnp.mean(jnp.sum(z**2, -1))
  mesh = Mesh(np.array(jax.devices()), ("data",))
  grad = jax.jit(
    jax.shard_map(
      lambda p, x, y: pf_jax.sam_gradient(
        p,
        x,
        y,
        apply_fn=fn,
        loss_fn=loss,
        rho=rho,
        objective="random",
        rng=jax.random.PRNGKey(0),
        axis_name="data",
      )[0],
      mesh=mesh,
      in_specs=(P(), P("data"), P("data")),
      out_specs=P(),
    )
  )
  x = jax.device_put(jnp.zeros((16, 1)), NamedSharding(mesh, P("data")))
  y = jax.device_put(jnp.zeros(16, jnp.int32), NamedSharding(mesh, P("data")))
  d = (grad(jax.device_put(w, NamedSharding(mesh, P())), x, y)["w"] - w["w"]) / rho
  assert float(jnp.sum(d**2)) == pytest.approx(1 / 8, abs=0.03)


def test_optax_transformation_under_shard_map_matches_one_device():
  params, x, y = make_problem(32)
  base = optax.chain(optax.clip_by_global_norm(0.1), pf_jax.adamw(1e-2, weight_decay=0.3))
  make = lambda axis: pf_jax.sam(
    base,
    0.3,
    apply_fn=apply_fn,
    loss_fn=pf_jax.softmax_cross_entropy,
    objective=pf_jax.obf(0.25),
    m=4,
    axis_name=axis,
  )

  def run(tx, step, params, x, y):
    state = tx.init(params)
    for _ in range(3):
      upd, state = step(state, params, x, y)
      params = optax.apply_updates(params, upd)
    return params

  tx1 = make(None)
  one = run(
    tx1, jax.jit(lambda s, p, x, y: tx1.update(None, s, p, inputs=x, labels=y)), params, x, y
  )
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tx8 = make("data")
  step8 = jax.jit(
    jax.shard_map(
      lambda s, p, x, y: tx8.update(None, s, p, inputs=x, labels=y),
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=(P(), P()),
    )
  )
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  eight = run(tx8, step8, put(params, P()), put(x, P("data")), put(y, P("data")))
  assert_trees_close(eight, one)
  assert not np.allclose(one["W1"], params["W1"])
