"""The SAM family against a sequential NumPy re-implementation (tests/reference.py), float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pf_jax
from pf_jax import sam_family
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


def forward(p, batch):
  return apply_fn(p, batch[0])


def sam_grad(p, x, y, loss_fn, spec, **kw):
  """The SAM-family gradient of the (x, y) batch through the public functional core."""
  step, rng = kw.pop("step", None), kw.pop("rng", None)
  fn = pf_jax.sam_value_and_grad(forward, loss_fn, spec, **kw)
  return fn(p, (jnp.asarray(x), jnp.asarray(y)), step=step, rng=rng)


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
  spec = pf_jax.SamSpec(rho=rho, m=m, **kw)
  with jax.enable_x64(True):
    (loss, _, metrics), grads = jax.jit(lambda p: sam_grad(p, x, y, loss_fn, spec))(
      jax.tree.map(jnp.asarray, p)
    )
    assert grads["W1"].dtype == jnp.float64
  assert _rel_err(grads, want) <= 1e-6
  assert float(loss) == pytest.approx(float(ref.loss(ref_kw["loss"], p, x, y)), rel=1e-9)
  assert float(metrics["rho"]) == pytest.approx(rho)
  # The perturbation matters: the plain gradient is far from the SAM gradient.
  plain = ref.backprop(p, x, ref.loss_dz(ref_kw["loss"], ref.forward(p, x)[0], y))
  assert _rel_err(plain, want) > 1e-3


def test_auto_chunk_strategy():
  assert [sam_family.chunk_strategy("auto", n) for n in (2, 16, 17, 64)] == [
    "unroll",
    "unroll",
    "scan",
    "scan",
  ]
  assert sam_family.chunk_strategy("vmap", 64) == "vmap"


@pytest.mark.parametrize("mode", ["scan", "unroll", "auto"])
def test_chunk_modes_match_vmap(problem, mode):
  p, x, y = problem
  spec = lambda mode: pf_jax.SamSpec(
    rho=0.2, m=4, gsam_alpha=0.2, chunk_mode=mode, objective=pf_jax.obf(0.25, 1.0, "softmax")
  )
  with jax.enable_x64(True):
    p = jax.tree.map(jnp.asarray, p)
    a = sam_grad(p, x, y, pf_jax.softmax_cross_entropy, spec("vmap"))[1]
    b = jax.jit(lambda q: sam_grad(q, x, y, pf_jax.softmax_cross_entropy, spec(mode)))(p)[1]
  for k in ref.KEYS:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-14)


def test_xi_zero_is_sam(problem):
  p, x, y = problem
  want = ref.sam_grad(p, x, y, 8, rho=0.1, objective="steepest", loss="softmax")
  spec = pf_jax.SamSpec(rho=0.1, m=8, gsam_alpha=0.0, gsam_normalized_backup=True)
  with jax.enable_x64(True):
    got = sam_grad(jax.tree.map(jnp.asarray, p), x, y, pf_jax.softmax_cross_entropy, spec)[1]
  assert _rel_err(got, want) <= 1e-6


def test_no_spec_is_the_plain_gradient(problem):
  p, x, y = problem
  with jax.enable_x64(True):
    (loss, aux, metrics), got = sam_grad(
      jax.tree.map(jnp.asarray, p), x, y, pf_jax.softmax_cross_entropy, None
    )
  want = ref.backprop(p, x, ref.loss_dz("softmax", ref.forward(p, x)[0], y))
  assert _rel_err(got, want) <= 1e-12
  assert aux is None and set(metrics) == {"loss"}


def test_accumulation_is_chunking_of_the_micro_batches(problem):
  """m=None with 2 micro-batches of 16: each micro-batch is one chunk, i.e. the reference with
  m = 16, not m = 32 (the whole batch, what ignoring accumulation would compute)."""
  p, x, y = problem
  want = ref.sam_grad(p, x, y, 16, rho=0.2, objective="steepest", loss="softmax")
  whole = ref.sam_grad(p, x, y, 32, rho=0.2, objective="steepest", loss="softmax")
  assert _rel_err(whole, want) > 1e-3  # the two differ: the test can fail
  spec = pf_jax.SamSpec(rho=0.2, m=None)
  with jax.enable_x64(True):
    got = sam_grad(
      jax.tree.map(jnp.asarray, p), x, y, pf_jax.softmax_cross_entropy, spec, accum_steps=2
    )[1]
  assert _rel_err(got, want) <= 1e-9


def test_dict_batch_soft_targets_and_aux(problem):
  """A dict batch with one-hot targets and an aux output gives the int-label gradient."""
  p, x, y = problem
  spec = pf_jax.SamSpec(rho=0.2, m=8, objective=pf_jax.obf(0.25, 1.0, "softmax"))
  want = ref.sam_grad(
    p,
    x,
    y,
    8,
    rho=0.2,
    objective="obf",
    loss="softmax",
    obf_kw=dict(predictions="softmax", lam=0.25, gamma=1.0),
  )
  fwd = lambda q, b: (apply_fn(q, b["x"]), {"mean_x": jnp.mean(b["x"])})
  with jax.enable_x64(True):
    batch = {"x": jnp.asarray(x), "label": jax.nn.one_hot(y, C, dtype=jnp.float64)}
    fn = pf_jax.sam_value_and_grad(fwd, pf_jax.softmax_cross_entropy, spec, has_aux=True)
    (_, aux, _), got = fn(jax.tree.map(jnp.asarray, p), batch)
  assert _rel_err(got, want) <= 1e-9
  np.testing.assert_allclose(aux["mean_x"], np.mean(x), rtol=1e-12)  # mean over the 4 chunks


def test_rho_schedule_follows_step(problem):
  p, x, y = problem
  spec = pf_jax.SamSpec(rho=lambda step: 0.1 * (step + 1))
  with jax.enable_x64(True):
    q = jax.tree.map(jnp.asarray, p)
    (_, _, metrics), got = sam_grad(q, x, y, pf_jax.softmax_cross_entropy, spec, step=2)
    with pytest.raises(ValueError, match="step="):
      sam_grad(q, x, y, pf_jax.softmax_cross_entropy, spec)
  want = ref.sam_grad(p, x, y, B, rho=0.3, objective="steepest", loss="softmax")
  assert float(metrics["rho"]) == pytest.approx(0.3)
  assert _rel_err(got, want) <= 1e-9


def test_rho_zero_reproduces_base_optimizer(problem):
  p, x, y = problem
  base = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, p)
    batch = (jnp.asarray(x), jnp.asarray(y))
    loss = lambda q: pf_jax.softmax_cross_entropy(forward(q, batch), batch)
    tx = pf_jax.sam(
      base,
      pf_jax.SamSpec(rho=0.0, m=8, objective=pf_jax.obf(0.25, 1.0, "softmax")),
      pf_jax.softmax_cross_entropy,
    )
    s_sam, s_base = tx.init(params), base.init(params)
    for _ in range(3):
      g = jax.grad(loss)(params)
      u_sam, s_sam = tx.update(g, s_sam, params, forward=forward, batch=batch)
      u_base, s_base = base.update(g, s_base, params)
      for k in ref.KEYS:
        np.testing.assert_allclose(u_sam[k], u_base[k], rtol=1e-10, atol=1e-13)
      params = optax.apply_updates(params, u_base)


@pytest.mark.parametrize(
  "spec_kw,passes",
  [
    (dict(), 2),  # steepest, one chunk: the caller's gradient is g_p
    (dict(gsam_alpha=0.2, asam="before"), 2),  # still steepest: g_p reused, then scaled
    (dict(m=8, chunk_mode="vmap"), 3),  # chunks need their own g_p (vmap: traced once)
    (dict(objective=pf_jax.obf(0.25, 1.0, "softmax")), 3),  # OBF ascends another objective
  ],
)
def test_transformation_reuses_incoming_gradient(problem, spec_kw, passes):
  """sam(base) == base applied to sam_value_and_grad's gradient, with rho following the step
  count; a standard loop traces the model twice per step when the gradient can be reused."""
  p, x, y = problem
  params = jax.tree.map(jnp.asarray, p)
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y))
  traces = []

  def counting_forward(q, b):
    traces.append(1)
    return forward(q, b)

  spec = pf_jax.SamSpec(rho=lambda step: 0.1 * (step + 1), **spec_kw)
  base = optax.sgd(0.5, momentum=0.9)
  loss_fn = pf_jax.sigmoid_cross_entropy
  tx = pf_jax.sam(base, spec, loss_fn)

  @jax.jit
  def train_step(q, state):  # a standard optax loop: gradient, then update
    grads = jax.grad(lambda r: loss_fn(counting_forward(r, batch), batch))(q)
    return tx.update(grads, state, q, forward=counting_forward, batch=batch)

  state, bstate = tx.init(params), base.init(params)
  for step in range(2):
    upd, state = train_step(params, state)
    if step == 0:
      assert len(traces) == passes
    _, g = sam_grad(params, *batch, loss_fn, spec, step=step)
    want, bstate = base.update(g, bstate, params)
    for k in ref.KEYS:
      np.testing.assert_allclose(upd[k], want[k], rtol=1e-5, atol=1e-7)
    params = optax.apply_updates(params, upd)
  assert int(state.count) == 2


def test_transformation_over_multisteps_base(problem):
  """sam(MultiSteps(base, 2)): every micro-batch gets its own SAM gradient, base steps on
  their mean every second call (MultiSteps outside sam would perturb with the wrong batch)."""
  p, x, y = problem
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, p)
    halves = [(jnp.asarray(x[i::2]), jnp.asarray(y[i::2])) for i in range(2)]
    base = optax.MultiSteps(optax.chain(optax.sgd(1.0)), every_k_schedule=2)
    tx = pf_jax.sam(base, pf_jax.SamSpec(rho=0.2), pf_jax.softmax_cross_entropy)
    state = tx.init(params)
    updates = []
    for b in halves:
      g = jax.grad(lambda q, b=b: pf_jax.softmax_cross_entropy(forward(q, b), b))(params)
      upd, state = tx.update(g, state, params, forward=forward, batch=b)
      updates.append(upd)
  want = [
    ref.sam_grad(p, x[i::2], y[i::2], 16, rho=0.2, objective="steepest", loss="softmax")
    for i in range(2)
  ]
  for k in ref.KEYS:
    np.testing.assert_array_equal(updates[0][k], 0.0)
    # (MultiSteps keeps its running mean in float32.)
    np.testing.assert_allclose(updates[1][k], -(want[0][k] + want[1][k]) / 2, rtol=1e-6, atol=1e-8)


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
    jax.grad(pf_jax.obf_fixed_alpha(1.0, "softmax"))(z, y),
    -jax.grad(ce_uniform)(z),
    rtol=1e-5,
    atol=1e-7,
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
  fn = lambda p, b: jnp.broadcast_to(p["w"], (b[0].shape[0], dim))
  loss = lambda z, y: 0.5 * jnp.mean(jnp.sum(z**2, -1))
  x, y = jnp.zeros((16, 1)), jnp.zeros(16, jnp.int32)

  def direction(key, m):
    spec = pf_jax.SamSpec(rho=rho, objective="random", m=m)
    g = pf_jax.sam_value_and_grad(fn, loss, spec)(w, (x, y), rng=key)[1]
    return (g["w"] - w["w"]) / rho  # mean over chunks of d_k

  k0, k1 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
  d0 = direction(k0, 16)
  assert float(jnp.linalg.norm(d0)) == pytest.approx(1.0, rel=1e-3)  # ||rho d|| = rho
  np.testing.assert_array_equal(d0, direction(k0, 16))  # reproducible
  assert abs(float(jnp.dot(d0, direction(k1, 16)))) < 0.1  # differs per step key
  # 4 chunks with independent directions: ||mean of 4 unit vectors||^2 ~ 1/4 (1 if identical).
  assert float(jnp.sum(direction(k0, 4) ** 2)) == pytest.approx(0.25, abs=0.05)
  with pytest.raises(ValueError, match="rng"):
    pf_jax.sam_value_and_grad(fn, loss, pf_jax.SamSpec(rho=rho, objective="random"))(w, (x, y))


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
  kw = dict(rho=0.1)
  kw.update(bad)
  with pytest.raises(ValueError, match=match):
    pf_jax.SamSpec(**kw)


@pytest.mark.parametrize(
  "factory,kw,match",
  [
    (pf_jax.obf, dict(lam=0.1, gamma=1.5, predictions="softmax"), "gamma"),
    (pf_jax.obf, dict(lam=0.1, gamma=-0.1, predictions="softmax"), "gamma"),
    (pf_jax.obf, dict(lam=1.0, gamma=1.0, predictions="softmax"), "lam"),
    (pf_jax.obf, dict(lam=-0.1, gamma=1.0, predictions="softmax"), "lam"),
    (pf_jax.obf, dict(lam=0.1, gamma=1.0, predictions="tanh"), "predictions"),
    (pf_jax.obf_fixed_alpha, dict(alpha=2.0, predictions="softmax"), "alpha"),
  ],
)
def test_invalid_obf_hyperparameters(factory, kw, match):
  with pytest.raises(ValueError, match=match):
    factory(**kw)


@pytest.mark.parametrize("m", [3, 12, 64])
def test_m_incompatible_with_batch_at_trace_time(problem, m):
  p, x, y = problem
  with pytest.raises(ValueError, match=f"m={m} must divide the per-device batch 8"):
    sam_grad(p, x[:8], y[:8], pf_jax.softmax_cross_entropy, pf_jax.SamSpec(rho=0.1, m=m))


def test_a_batch_dict_without_label_is_one_line_naming_its_keys(problem):
  """Issue 30: {"x": ..., "y": ...} in one's own loop was a bare KeyError: 'label' traceback.
  Through the optimizer (loss and OBF objective both read the labels) it is one line naming the
  keys given, the key looked for and the two ways to pass labels; a tuple batch then works."""
  p, x, y = problem
  p = jax.tree.map(jnp.asarray, p)  # float32 (the reference's float64 needs x64)
  spec = pf_jax.SamSpec(rho=0.1, objective=pf_jax.obf(0.1, 1.0, "softmax"), m=8)
  tx = pf_jax.sam(optax.sgd(0.1), spec, pf_jax.softmax_cross_entropy)
  grads = jax.tree.map(jnp.zeros_like, p)
  state = tx.init(p)
  with pytest.raises(ValueError) as e:
    tx.update(grads, state, p, forward=lambda w, b: apply_fn(w, b["x"]), batch={"x": x, "y": y})
  message = str(e.value)
  assert "\n" not in message, message
  for part in ("'label'", "'x', 'y'", "(inputs, labels) tuple", "(x, y)"):
    assert part in message, (part, message)
  tx.update(grads, state, p, forward=lambda w, b: apply_fn(w, b[0]), batch=(x, y))
