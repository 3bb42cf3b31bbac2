"""The SAM family against a sequential NumPy re-implementation (tests/reference.py), float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pf_jax
from tests import reference as ref

B, D_IN, H, C = 32, 5, 7, 4


def apply_fn(p, x):
  return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


LOSSES = {"softmax": pf_jax.softmax_cross_entropy, "sigmoid": pf_jax.sigmoid_cross_entropy}


@pytest.fixture
def problem():
  rng = np.random.default_rng(0)
  p = ref.init_mlp(rng, D_IN, H, C)
  x = rng.normal(size=(B, D_IN))
  y = rng.integers(0, C, size=B)
  return p, x, y


# (name, pf_jax kwargs, reference kwargs)
VARIANTS = [
  ("sam", dict(), dict(objective="steepest")),
  ("sam_sigmoid", dict(loss="sigmoid"), dict(objective="steepest", loss="sigmoid")),
  ("gsam", dict(gsam_alpha=0.3), dict(objective="steepest", xi=0.3)),
  (
    "gsam_normbackup",
    dict(gsam_alpha=0.3, gsam_normalized_backup=True),
    dict(objective="steepest", xi=0.3, norm_backup=True),
  ),
  (
    "asam_before",
    dict(asam="before", asam_eta=0.01),
    dict(objective="steepest", asam="before", eta=0.01),
  ),
  ("asam_after", dict(asam="after"), dict(objective="steepest", asam="after")),
  (
    "asam_both",
    dict(asam="both", asam_eta=0.01),
    dict(objective="steepest", asam="both", eta=0.01),
  ),
  (
    "obf_softmax_lam1C_g1",
    dict(obf=("softmax", 1 / C, 1.0)),
    dict(objective="obf", obf_kw=dict(predictions="softmax", lam=1 / C, gamma=1.0)),
  ),
  (
    "obf_softmax_lam1C_g05",
    dict(obf=("softmax", 1 / C, 0.5)),
    dict(objective="obf", obf_kw=dict(predictions="softmax", lam=1 / C, gamma=0.5)),
  ),
  (
    "obf_softmax_lam0_g03",
    dict(obf=("softmax", 0.0, 0.3)),
    dict(objective="obf", obf_kw=dict(predictions="softmax", lam=0.0, gamma=0.3)),
  ),
  (
    "obf_sigmoid_lam1C_g1",
    dict(loss="sigmoid", obf=("sigmoid", 1 / C, 1.0)),
    dict(objective="obf", loss="sigmoid", obf_kw=dict(predictions="sigmoid", lam=1 / C, gamma=1.0)),
  ),
  (
    "obf_sigmoid_lam0_g07",
    dict(loss="sigmoid", obf=("sigmoid", 0.0, 0.7)),
    dict(objective="obf", loss="sigmoid", obf_kw=dict(predictions="sigmoid", lam=0.0, gamma=0.7)),
  ),
  (
    "obf_fixed_alpha",
    dict(alpha=("softmax", 0.25)),
    dict(objective="obf", obf_kw=dict(predictions="softmax", alpha=0.25)),
  ),
  (
    "gsam_obf",
    dict(gsam_alpha=0.4, obf=("sigmoid", 1 / C, 1.0), loss="sigmoid"),
    dict(
      objective="obf",
      loss="sigmoid",
      xi=0.4,
      obf_kw=dict(predictions="sigmoid", lam=1 / C, gamma=1.0),
    ),
  ),
  (
    "asam_obf",
    dict(asam="before", obf=("softmax", 1 / C, 1.0)),
    dict(objective="obf", asam="before", obf_kw=dict(predictions="softmax", lam=1 / C, gamma=1.0)),
  ),
]


def _pf_kwargs(kw):
  kw = dict(kw)
  loss = kw.pop("loss", "softmax")
  if "obf" in kw:
    pred, lam, gamma = kw.pop("obf")
    kw["objective"] = pf_jax.obf(lam, gamma, pred)
  if "alpha" in kw:
    pred, alpha = kw.pop("alpha")
    kw["objective"] = pf_jax.obf_fixed_alpha(alpha, pred)
  return LOSSES[loss], kw


def _rel_err(got, want):
  num = np.sqrt(sum(np.sum((np.asarray(got[k]) - want[k]) ** 2) for k in ref.KEYS))
  return num / ref.tnorm(want)


@pytest.mark.parametrize("m", [B, B // 4])
@pytest.mark.parametrize("name,pf_kw,ref_kw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_matches_sequential_reference(problem, name, pf_kw, ref_kw, m):
  p, x, y = problem
  rho = 0.3
  loss_fn, kw = _pf_kwargs(pf_kw)
  ref_kw = dict(ref_kw)
  ref_kw.setdefault("loss", "softmax")
  want = ref.sam_grad(p, x, y, m, rho=rho, **ref_kw)
  with jax.enable_x64(True):
    grads, _, metrics = jax.jit(
      lambda p: pf_jax.sam_gradient(
        p, jnp.asarray(x), jnp.asarray(y), apply_fn=apply_fn, loss_fn=loss_fn, rho=rho, m=m, **kw
      )
    )(jax.tree.map(jnp.asarray, p))
    assert grads["W1"].dtype == jnp.float64
  assert _rel_err(grads, want) <= 1e-6
  # The perturbation matters: the plain gradient is far from the SAM gradient.
  plain = ref.backprop(p, x, ref.loss_dz(ref_kw["loss"], ref.forward(p, x)[0], y))
  assert _rel_err(plain, want) > 1e-3


def test_scan_mode_matches_vmap_mode(problem):
  p, x, y = problem
  with jax.enable_x64(True):
    run = lambda mode: pf_jax.sam_gradient(
      jax.tree.map(jnp.asarray, p),
      jnp.asarray(x),
      jnp.asarray(y),
      apply_fn=apply_fn,
      loss_fn=pf_jax.softmax_cross_entropy,
      rho=0.2,
      m=4,
      gsam_alpha=0.2,
      chunk_mode=mode,
      objective=pf_jax.obf(0.25),
    )[0]
    a, b = run("vmap"), run("scan")
  for k in ref.KEYS:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-14)


def test_xi_zero_is_sam(problem):
  p, x, y = problem
  want = ref.sam_grad(p, x, y, 8, rho=0.1, objective="steepest", loss="softmax")
  with jax.enable_x64(True):
    got = pf_jax.sam_gradient(
      jax.tree.map(jnp.asarray, p),
      jnp.asarray(x),
      jnp.asarray(y),
      apply_fn=apply_fn,
      loss_fn=pf_jax.softmax_cross_entropy,
      rho=0.1,
      m=8,
      gsam_alpha=0.0,
      gsam_normalized_backup=True,
    )[0]
  assert _rel_err(got, want) <= 1e-6


def test_rho_zero_reproduces_base_optimizer(problem):
  p, x, y = problem
  base = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, p)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    loss = lambda q: pf_jax.softmax_cross_entropy(apply_fn(q, xj), yj)
    tx = pf_jax.sam(
      base,
      0.0,
      apply_fn=apply_fn,
      loss_fn=pf_jax.softmax_cross_entropy,
      m=8,
      objective=pf_jax.obf(0.25),
    )
    s_sam, s_base = tx.init(params), base.init(params)
    for _ in range(3):
      u_sam, s_sam = tx.update(None, s_sam, params, inputs=xj, labels=yj)
      u_base, s_base = base.update(jax.grad(loss)(params), s_base, params)
      for k in ref.KEYS:
        np.testing.assert_allclose(u_sam[k], u_base[k], rtol=1e-10, atol=1e-13)
      params = optax.apply_updates(params, u_base)


def test_transformation_is_the_function_then_base(problem):
  """sam(base) == base applied to sam_gradient, with rho scheduled by the step count."""
  p, x, y = problem
  params = jax.tree.map(jnp.asarray, p)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  rho_schedule = lambda step: 0.1 * (step + 1)
  kw = dict(apply_fn=apply_fn, loss_fn=pf_jax.sigmoid_cross_entropy, m=8, gsam_alpha=0.1)
  base = optax.sgd(0.5, momentum=0.9)
  tx = pf_jax.sam(base, rho_schedule, **kw)
  state, bstate = tx.init(params), base.init(params)
  for step in range(2):
    upd, state = jax.jit(lambda s, q: tx.update(None, s, q, inputs=xj, labels=yj))(state, params)
    g, _, _ = pf_jax.sam_gradient(params, xj, yj, rho=rho_schedule(step), **kw)
    want, bstate = base.update(g, bstate, params)
    for k in ref.KEYS:
      np.testing.assert_allclose(upd[k], want[k], rtol=1e-5, atol=1e-7)
    assert float(state.metrics["rho"]) == pytest.approx(rho_schedule(step))
    params = optax.apply_updates(params, upd)


def test_obf_alpha_one_is_ascent_on_cross_entropy_to_uniform():
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, size=6))
  for pred, p in (
    ("softmax", ref.softmax(np.asarray(z, np.float64))),
    ("sigmoid", ref.sigmoid(np.asarray(z, np.float64))),
  ):
    got = jax.grad(pf_jax.obf_fixed_alpha(1.0, pred))(z, y)
    # CE(uniform, z) = -sum_c (1/C) log p_c has dz-gradient (p - 1/C) for softmax; OBF ascends
    # its negative: dL/dz = (1/C - p) / B, whatever the labels.
    np.testing.assert_allclose(got, (1 / 5 - p) / 6, rtol=1e-5, atol=1e-7)
  # Closed form for softmax from the CE itself: the same as -grad of CE to uniform.
  ce_uniform = lambda z: -jnp.mean(jnp.sum(jax.nn.log_softmax(z) / 5, -1))
  np.testing.assert_allclose(
    jax.grad(pf_jax.obf_fixed_alpha(1.0))(z, y), -jax.grad(ce_uniform)(z), rtol=1e-5, atol=1e-7
  )


def test_obf_alpha_corners():
  p = jnp.array([1.0, 0.1, 0.05, 0.0, 0.55])
  np.testing.assert_allclose(
    pf_jax.obf_alpha(p, 0.1, 1.0), [1.0, 0.0, 0.0, 0.0, (1 - 0.1 / 0.55) / 0.9], rtol=1e-6
  )
  np.testing.assert_allclose(
    pf_jax.obf_alpha(p, 0.0, 0.3), np.full(5, 0.3), rtol=1e-6
  )  # lam = 0: gamma
  np.testing.assert_allclose(pf_jax.obf_alpha(p, 0.1, 0.0), np.zeros(5))  # gamma = 0
  np.testing.assert_allclose(pf_jax.obf_alpha(p, 0.1, 0.5)[0], 0.5)  # p_y = 1: gamma


def test_random_direction_norm_and_reproducibility():
  """Loss 0.5 ||w||^2 has gradient w, so g at theta + rho d reveals d = (g - w) / rho."""
  dim, rho = 4096, 0.7
  w = {"w": jnp.asarray(np.random.default_rng(0).normal(size=dim), jnp.float32)}
  fn = lambda p, x: jnp.broadcast_to(p["w"], (x.shape[0], dim))
  loss = lambda z, y: 0.5 * jnp.mean(jnp.sum(z**2, -1))
  x, y = jnp.zeros((16, 1)), jnp.zeros(16, jnp.int32)

  def direction(key, m):
    g = pf_jax.sam_gradient(
      w, x, y, apply_fn=fn, loss_fn=loss, rho=rho, objective="random", m=m, rng=key
    )[0]
    return (g["w"] - w["w"]) / rho  # mean over chunks of d_k

  k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  d0 = direction(k0, 16)
  assert float(jnp.linalg.norm(d0)) == pytest.approx(1.0, rel=1e-3)  # ||rho d|| = rho
  np.testing.assert_array_equal(d0, direction(k0, 16))  # reproducible
  assert abs(float(jnp.dot(d0, direction(k1, 16)))) < 0.1  # differs per step key
  # 4 chunks with independent directions: ||mean of 4 unit vectors||^2 ~ 1/4 (1 if identical).
  assert float(jnp.sum(direction(k0, 4) ** 2)) == pytest.approx(0.25, abs=0.05)
  with pytest.raises(ValueError, match="rng"):
    pf_jax.sam_gradient(w, x, y, apply_fn=fn, loss_fn=loss, rho=rho, objective="random")


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(rho=-0.1), "rho"),
    (dict(gsam_alpha=-1.0), "gsam_alpha"),
    (dict(asam="sideways"), "asam"),
    (dict(asam_eta=-1.0), "asam_eta"),
    (dict(chunk_mode="loop"), "chunk_mode"),
    (dict(objective="sharpest"), "objective"),
    (dict(m=0), "m"),
  ],
)
def test_invalid_hyperparameters_at_construction(bad, match):
  kw = dict(rho=0.1, apply_fn=apply_fn, loss_fn=pf_jax.softmax_cross_entropy)
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    pf_jax.sam(optax.sgd(0.1), **kw)


@pytest.mark.parametrize(
  "factory,kw,match",
  [
    (pf_jax.obf, dict(lam=0.1, gamma=1.5), "gamma"),
    (pf_jax.obf, dict(lam=0.1, gamma=-0.1), "gamma"),
    (pf_jax.obf, dict(lam=1.0, gamma=1.0), "lam"),
    (pf_jax.obf, dict(lam=-0.1, gamma=1.0), "lam"),
    (pf_jax.obf, dict(lam=0.1, predictions="tanh"), "predictions"),
    (pf_jax.obf_fixed_alpha, dict(alpha=2.0), "alpha"),
  ],
)
def test_invalid_obf_hyperparameters(factory, kw, match):
  with pytest.raises(ValueError, match=match):
    factory(**kw)


@pytest.mark.parametrize("m,match", [(3, "divide"), (12, "multiple"), (64, "axis_name")])
def test_m_incompatible_with_batch_at_trace_time(problem, m, match):
  p, x, y = problem
  with pytest.raises(ValueError, match=match):
    pf_jax.sam_gradient(
      p,
      jnp.asarray(x[:8]),
      jnp.asarray(y[:8]),
      apply_fn=apply_fn,
      loss_fn=pf_jax.softmax_cross_entropy,
      rho=0.1,
      m=m,
    )
