"""pf_jax.analysis against independent computations: numpy eigh, hand-computed entropies,
scipy's Kendall tau, the sequential NumPy reference of the perturbation, and the trainer's eval."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.flatten_util import ravel_pytree

import pf_jax
from pf_jax import analysis
from pf_jax.analysis import forgetting
from pf_jax.analysis import information
from tests import reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LN2 = np.log(2.0)


# ---------------------------------------------------------------------------------------------
# Sharpness: power iteration vs the full Hessian.


def _mlp_problem():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(5, 6)), "b1": rng.normal(size=6), "w2": rng.normal(size=(6, 3))}
  batches = {"x": rng.normal(size=(3, 10, 5)), "y": rng.integers(0, 3, size=(3, 10))}

  def loss(p, b):
    z = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), b["y"][:, None], axis=1))

  return params, batches, loss


@pytest.mark.parametrize("num_devices", [1, 8])
def test_power_iteration_matches_full_hessian(num_devices):
  params, batches, loss = _mlp_problem()
  with jax.enable_x64(True):
    flat, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
    mean_loss = lambda f: jnp.mean(
      jnp.stack([loss(unravel(f), jax.tree.map(lambda a, i=i: a[i], batches)) for i in range(3)])
    )
    eigs = np.linalg.eigh(np.asarray(jax.hessian(mean_loss)(flat)))[0]
    want = eigs[np.argmax(np.abs(eigs))]
    # Parameters committed to one device, as restored from a checkpoint.
    committed = jax.device_put(jax.tree.map(jnp.asarray, params), jax.devices()[0])
    got = analysis.hessian_top_eigenvalue(
      loss,
      committed,
      batches,
      num_iters=2000,
      tol=1e-9,
      rng=jax.random.PRNGKey(0),
      devices=jax.devices()[:num_devices],
    )
  assert abs(got - want) <= 1e-3 * abs(want)
  # The largest eigenvalue is not the largest in magnitude here only if a negative one is:
  assert want == eigs.max() or want == eigs.min()


def test_power_iteration_keeps_the_sign_of_a_negative_dominant_eigenvalue():
  h = np.diag([-3.0, 1.0, 0.5])  # loss 0.5 x^T H x has Hessian H
  loss = lambda p, b: 0.5 * jnp.dot(p, b["h"] @ p)
  got = analysis.hessian_top_eigenvalue(
    loss,
    jnp.ones(3),
    {"h": h[None].astype(np.float32)},
    num_iters=500,
    tol=1e-7,
    rng=jax.random.PRNGKey(1),
  )
  assert abs(got + 3.0) < 1e-3


def test_power_iteration_reports_progress():
  """Every iteration reports (i, estimate); the last estimate is the result. With H = diag(2, 1)
  and start v, iteration k's estimate is v_k^T H v_k of the normalized H^(k-1) v (by hand)."""
  h = np.diag([2.0, 1.0])
  seen = []
  got = analysis.hessian_top_eigenvalue(
    lambda p, b: 0.5 * jnp.dot(p, b["h"] @ p),
    jnp.ones(2),
    {"h": h[None].astype(np.float32)},
    num_iters=5,
    tol=0.0,
    rng=jax.random.PRNGKey(1),
    progress=lambda i, e: seen.append((i, e)),
  )
  assert [i for i, _ in sorted(seen)] == [1, 2, 3, 4, 5]
  assert sorted(seen)[-1][1] == pytest.approx(got)
  import optax  # pylint: disable=g-import-not-at-top

  start = optax.tree.random_like(jax.random.PRNGKey(1), jnp.ones(2), jax.random.normal)
  v = np.asarray(start, np.float64)  # the start vector, as optax draws it
  for _, e in sorted(seen):
    v = v / np.linalg.norm(v)
    assert e == pytest.approx(v @ h @ v, rel=1e-5)
    v = h @ v


# ---------------------------------------------------------------------------------------------
# Binned information, by hand.


def _probs_from_bits(bits):
  return np.where(np.asarray(bits, bool), 0.9, 1e-6)


def test_outputs_constant_within_each_class_have_no_superfluous_information():
  labels = np.array([0, 0, 0, 1, 1, 2])
  probs = _probs_from_bits(np.eye(3)[labels])
  cond, rel = analysis.binned_information(probs, labels, [1e-3, 0.5])
  np.testing.assert_allclose(cond, 0.0, atol=1e-12)
  h_y = -(0.5 * np.log(0.5) + (1 / 3) * np.log(1 / 3) + (1 / 6) * np.log(1 / 6))
  np.testing.assert_allclose(rel, h_y, rtol=1e-12)  # the pattern is the label: rel = H(Y)


def test_distinct_pattern_per_example_gives_h_x_given_y():
  n, c = 12, 8
  bits = (np.arange(1, n + 1)[:, None] >> np.arange(c)) & 1  # example i's code: binary of i + 1
  labels = np.arange(n) % 3  # 4 examples per class
  cond, _ = analysis.binned_information(_probs_from_bits(bits), labels, [1e-3, 0.5])
  np.testing.assert_allclose(cond, np.log(n) - np.log(3), rtol=1e-12)  # H(X|Y) = log 4


def test_labels_recoverable_from_the_pattern_give_rel_h_y_and_cond_the_extra_bit():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  extra = np.array([0, 1, 1, 1, 0, 0, 1, 1])  # a label-independent-ish extra output bit
  bits = np.stack([labels == 0, labels == 1, extra], axis=1)
  cond, rel = analysis.binned_information(_probs_from_bits(bits), labels, [0.5])
  # H(B|Y) = 1/2 H(1/4, 3/4) + 1/2 H(1/2, 1/2); I(B;Y) = H(Y) = ln 2.
  h = lambda *p: -sum(q * np.log(q) for q in p)
  np.testing.assert_allclose(cond, 0.5 * h(0.25, 0.75) + 0.5 * LN2, rtol=1e-12)
  np.testing.assert_allclose(rel, LN2, rtol=1e-12)


def test_binarization_is_strict_and_per_threshold():
  probs = np.array([[0.5, 0.2], [0.2, 0.5]])
  labels = np.array([0, 1])
  cond, rel = analysis.binned_information(probs, labels, [0.5, 0.3, 0.1])
  # t = 0.5: nothing is > t, one bin; t = 0.3: two bins = the labels; t = 0.1: one bin again.
  np.testing.assert_allclose(rel, [0.0, LN2, 0.0], atol=1e-12)
  np.testing.assert_allclose(cond, 0.0, atol=1e-12)


def _naive_information(probs, labels, t):
  """Dictionaries of byte strings: a slow, obviously right count."""
  joint, bins, ys = {}, {}, {}
  for p, y in zip(probs, labels):
    key = (p > t).tobytes()
    joint[(key, y)] = joint.get((key, y), 0) + 1
    bins[key] = bins.get(key, 0) + 1
    ys[y] = ys.get(y, 0) + 1
  n = len(labels)
  h = lambda counts: -sum(c / n * np.log(c / n) for c in counts)
  cond = h(joint.values()) - h(ys.values())
  return cond, h(bins.values()) - cond


def test_thousand_classes_match_a_naive_count():
  rng = np.random.default_rng(0)
  n, c = 3000, 1000
  logits = rng.normal(size=(n, c)) * 3
  labels = rng.integers(0, c, size=n)
  logits[np.arange(n), labels] += 8  # peaked, like a trained model
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  t = analysis.thresholds()
  cond, rel = analysis.binned_information(probs.astype(np.float32), labels, t)
  assert cond.shape == rel.shape == (100,)
  for i in (30, 80, 90):
    want = _naive_information(probs.astype(np.float32), labels, t[i])
    np.testing.assert_allclose((cond[i], rel[i]), want, rtol=1e-9, atol=1e-12)
  assert cond.max() > 1.0 and rel.max() > 1.0  # the test would notice all-zero curves


# ---------------------------------------------------------------------------------------------
# Adjusted thresholds and forgetting.


def _bump(r, peak, width):
  """A curve that rises to its maximum at r = peak and falls to 0 at r = 0."""
  up = np.exp(-(((r - peak) / width) ** 2))
  return np.where(r < peak, up, 1.0 - (r - peak) / (0.0 - peak)) * 2.3


def test_adjustment_maps_the_unperturbed_curve_onto_the_line():
  r = information.THRESHOLD_EXPONENTS
  cond = _bump(r, -4.0, 2.0)
  r_a = analysis.adjusted_exponents(cond)
  a = forgetting.ADJUSTED_THRESHOLDS
  np.testing.assert_allclose(np.interp(r_a, r, cond / cond.max()), 1.0 - a, atol=1e-9)
  assert np.all(np.diff(r_a) >= 0) and r_a[0] == r[np.argmax(cond)] and r_a[-1] <= 0.0


def test_adjustment_of_a_wiggly_curve_follows_its_envelope():
  r = information.THRESHOLD_EXPONENTS
  cond = _bump(r, -6.0, 2.0) * (1 + 0.05 * np.sin(7 * r))  # not monotone past the peak
  r_a = analysis.adjusted_exponents(cond)
  peak = np.argmax(cond)
  envelope = np.minimum.accumulate(cond[peak:] / cond[peak])
  assert np.all(np.diff(r_a) >= 0)
  np.testing.assert_allclose(
    np.interp(r_a, r[peak:], envelope), 1.0 - forgetting.ADJUSTED_THRESHOLDS, atol=1e-9
  )


def test_unchanged_outputs_mean_zero_forgetting_and_a_constant_model_none():
  rng = np.random.default_rng(1)
  probs = jax.nn.softmax(rng.normal(size=(200, 10)) * 4)
  labels = rng.integers(0, 10, size=200)
  cond, rel = analysis.binned_information(probs, labels, analysis.thresholds())
  f, task = analysis.point_measures(cond, rel, cond, rel)
  np.testing.assert_array_equal(f, 0.0)
  np.testing.assert_array_equal(task, 0.0)
  # Forgetting every superfluous bit (theta^p outputs constant per class) gives f = 1 - a.
  const = np.eye(10)[labels] * 0.9 + 0.01
  cond_p, rel_p = analysis.binned_information(const, labels, analysis.thresholds())
  f, _ = analysis.point_measures(cond, rel, cond_p, rel_p)
  r_a = analysis.adjusted_exponents(cond)
  np.testing.assert_allclose(
    f, np.interp(r_a, analysis.THRESHOLD_EXPONENTS, cond) / cond.max(), atol=1e-12
  )
  assert np.isnan(analysis.point_measures(np.zeros(100), np.zeros(100), cond, rel)[0]).all()


# ---------------------------------------------------------------------------------------------
# Correlation.


def test_kendall_tau_equals_scipy_with_ties():
  rng = np.random.default_rng(0)
  for n in (5, 17, 40):
    x = rng.integers(0, 4, size=n).astype(float)
    y = x + rng.integers(0, 3, size=n)
    assert abs(analysis.kendall_tau(x, y) - scipy.stats.kendalltau(x, y).statistic) < 1e-12
    z = rng.normal(size=n)
    assert abs(analysis.kendall_tau(z, y) - scipy.stats.kendalltau(z, y).statistic) < 1e-12
  assert np.isnan(analysis.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_permutation_pvalue_is_uniform_under_independence_and_small_for_monotone():
  rng = np.random.default_rng(0)
  # n = 30: tau takes 436 values, fine enough for the p-value to be nearly continuous.
  pvalues = np.array(
    [
      analysis.permutation_pvalue(
        rng.normal(size=30), rng.normal(size=30), num_permutations=199, seed=i
      )
      for i in range(300)
    ]
  )
  assert scipy.stats.kstest(pvalues, "uniform").statistic < 0.08
  for level in (0.05, 0.2, 0.5):
    assert abs(np.mean(pvalues <= level) - level) < 0.05
  x = np.arange(15.0)
  assert (
    analysis.permutation_pvalue(x, x + rng.normal(size=15) * 0.5, num_permutations=999) <= 0.002
  )
  # Agrees with scipy's exact two-sided p-value for a moderate relation (no ties).
  x, y = rng.normal(size=9), rng.normal(size=9)
  y = y + x
  want = scipy.stats.kendalltau(x, y, method="exact").pvalue
  assert abs(analysis.permutation_pvalue(x, y, num_permutations=20_000) - want) < 0.01


def test_permutation_pvalues_are_the_sequential_ones_per_column_and_of_the_max():
  from pf_jax.analysis import correlation  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(3)
  x = rng.normal(size=10)
  ys = np.stack([x + rng.normal(size=10) * w for w in (0.5, 2.0, 4.0)], axis=1)
  ys = np.concatenate([ys, np.ones((10, 1))], axis=1)  # a constant column: no tau, left out
  each, any_p = correlation.permutation_pvalues(x, ys, num_permutations=500, seed=5)
  # One permutation at a time, the documented draw, the rows of ys permuted together.
  perms = np.argsort(np.random.default_rng(5).random((500, 10)), axis=1)
  tau = lambda a, b: abs(scipy.stats.kendalltau(a, b).statistic)  # noqa: E731
  observed = [tau(x, ys[:, j]) for j in range(3)]
  null = np.array([[tau(x, ys[p, j]) for j in range(3)] for p in perms])  # [500, 3]
  for j in range(3):
    assert each[j] == (1 + np.sum(null[:, j] >= observed[j] - 1e-12)) / 501
    assert each[j] == analysis.permutation_pvalue(x, ys[:, j], num_permutations=500, seed=5)
  assert np.isnan(each[3])
  assert any_p == (1 + np.sum(null.max(axis=1) >= max(observed) - 1e-12)) / 501
  assert any_p >= each[:3].min()  # choosing the column afterwards costs
  assert np.isnan(correlation.permutation_pvalues(x, np.ones((10, 2)))[1])


def test_bootstrap_intervals_are_scipys_tau_over_the_same_resamples():
  from pf_jax.analysis import correlation  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  x = rng.normal(size=12)
  ys = np.stack([np.round(x + rng.normal(size=12), 1), 2 * x + 1, np.ones(12)], axis=1)
  got = correlation.bootstrap_intervals(x, ys, num_resamples=300, level=0.9, seed=7)
  idx = np.random.default_rng(7).integers(0, 12, (300, 12))  # the documented draw
  taus = [scipy.stats.kendalltau(x[i], ys[i, 0]).statistic for i in idx]  # one at a time
  want = np.quantile([t for t in taus if np.isfinite(t)], [0.05, 0.95])
  np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-12)
  assert got[0, 0] < analysis.kendall_tau(x, ys[:, 0]) < got[0, 1]
  # A perfect ranking stays perfect in every resample; an undefined tau has no interval.
  assert got[1].tolist() == [1.0, 1.0] and np.isnan(got[2]).all()


# ---------------------------------------------------------------------------------------------
# theta^p of the collection is the training perturbation (sequential NumPy reference).

B, D_IN, H, C = 16, 5, 7, 4


def _apply(p, x):
  return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


@pytest.mark.parametrize(
  "objective,asam,m",
  [("steepest", None, 4), ("obf", "before", 8), ("obf", "after", 16), ("steepest", "both", 2)],
)
def test_perturbed_logits_use_each_chunks_own_training_perturbation(objective, asam, m):
  rng = np.random.default_rng(3)
  p = ref.init_mlp(rng, D_IN, H, C)
  x, y = rng.normal(size=(B, D_IN)), rng.integers(0, C, size=B)
  rho, obf_kw = 0.3, dict(predictions="softmax", lam=0.25, gamma=1.0)
  spec = pf_jax.SamSpec(
    rho=rho,
    m=m,
    asam=asam,
    asam_eta=0.01,
    objective=pf_jax.obf(0.25, 1.0, "softmax") if objective == "obf" else "steepest",
  )
  with jax.enable_x64(True):
    clean, perturbed = jax.jit(
      lambda q: pf_jax.perturbed_logits(
        lambda p, b: _apply(p, b[0]),
        pf_jax.softmax_cross_entropy,
        spec,
        q,
        (jnp.asarray(x), jnp.asarray(y)),
      )
    )(jax.tree.map(jnp.asarray, p))
  want = []
  for i in range(0, B, m):
    pt = ref.perturb(
      p,
      x[i : i + m],
      y[i : i + m],
      loss="softmax",
      rho=rho,
      objective=objective,
      obf_kw=obf_kw,
      asam=asam,
      eta=0.01,
    )[0]  # theta^p
    want.append(ref.forward(pt, x[i : i + m])[0])
  np.testing.assert_allclose(clean, ref.forward(p, x)[0], rtol=1e-12)
  np.testing.assert_allclose(perturbed, np.concatenate(want), rtol=1e-9, atol=1e-12)
  assert np.abs(perturbed - clean).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# The training system: collection, sharpness, Figure 2 and the table on tiny runs.


def _tiny_digits_config(perturbation, m, seed=0):
  from configs import digits_msweep  # pylint: disable=g-import-not-at-top

  c = digits_msweep.get_config(f"{'steep' if perturbation == 'steepest' else perturbation},{m}")
  c.seed = seed
  c.num_train_steps = 6
  c.warmup_steps = 1
  c.lr_max = c.lr_min = 3e-3
  c.analysis.collect_every_steps = 3
  c.analysis.sharpness_examples = 128
  c.analysis.sharpness_batch_size = 64
  c.eval_every_steps = 3
  c.log_every_steps = 3
  c.checkpoint_every_steps = 6
  return c


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.long  # CI runs it (-m long); not in the default suite
def test_collection_records_theta_and_theta_p_and_matches_the_evaluation(tmp_path):
  from pf_jax import train  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import collect  # pylint: disable=g-import-not-at-top

  c = _tiny_digits_config("obf", 4)
  c.data_dir = str(tmp_path / "data")
  c.checkpoint_every_steps = 3
  results = train.train_and_evaluate(c, str(tmp_path / "run"))
  points = collect.load_points(str(tmp_path / "run"))
  assert [int(p["step"]) for p in points] == [3, 6]
  last = points[-1]
  assert int(last["num_examples"]) == 359 == last["probs"].shape[0] == last["probs_p"].shape[0]
  # Accuracy at theta is the trainer's own evaluation of the same parameters.
  assert abs(float(last["accuracy"]) - results["eval/digits/top1"]) < 1e-6
  # Softmax likelihoods (Section 6.1) although the run's loss is sigmoid cross-entropy.
  assert c.loss == "sigmoid_xent" and c.analysis.predictions == "softmax"
  for k in ("probs", "probs_p"):
    assert np.all(last[k] > 0)
    np.testing.assert_allclose(last[k].sum(axis=-1), 1.0, rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(
    last["cond"],
    analysis.binned_information(last["probs"], last["labels"], analysis.thresholds())[0],
  )
  assert not np.allclose(last["probs"], last["probs_p"])
  assert float(last["epoch"]) == pytest.approx(6 * 64 / 1438, rel=1e-12)  # digits train: 1,438

  # A run stopped right after its step-3 checkpoint, before collecting (e.g. preempted there),
  # collects step 3 when it resumes; every point is what the uninterrupted run recorded.

  run = tmp_path / "run"
  shutil.rmtree(run / "checkpoints" / "6")
  for step in (3, 6):
    os.remove(run / "forgetting" / f"step_{step:09d}.npz")
  os.remove(run / "results.json")
  train.train_and_evaluate(c, str(run))
  again = collect.load_points(str(run))
  assert [int(p["step"]) for p in again] == [3, 6]
  for a, b in zip(points, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _fake_run(
  workdir, *, perturbation, m, seed, accuracy, sharpness=None, forget=None, sharpness_step=660
):
  """A finished run's files written by hand: config, results (step 660), sharpness (measured at
  `sharpness_step`) and collection points whose perturbed information curves are the unperturbed
  ones scaled by (1 - forget)."""
  from configs import digits_msweep  # pylint: disable=g-import-not-at-top
  from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import collect  # pylint: disable=g-import-not-at-top

  c = digits_msweep.get_config(f"{perturbation},{m}")
  c.seed = seed
  workdir_lib.save_config(workdir, c)
  workdir_lib.save_results(
    workdir, 660, {"eval/digits/top1": accuracy, "eval/digits/loss": 1.0 - accuracy}
  )
  if sharpness is not None:
    with open(os.path.join(workdir, "sharpness.json"), "w") as f:
      json.dump({"sharpness": sharpness, "step": sharpness_step}, f)
  r = information.THRESHOLD_EXPONENTS
  for step, peak in ((110, -2.0), (220, -5.0)):
    cond, rel = _bump(r, peak, 1.5), 0.5 * _bump(r, peak - 1, 1.0)
    collect.save_point(
      workdir,
      {
        "step": np.int64(step),
        "threshold_exponents": r,
        "cond": cond,
        "rel": rel,
        "cond_p": (1 - forget) * cond,
        "rel_p": (1 + forget) * rel,
      },
    )


def test_figure2_taus_on_a_pool_with_known_ranks(tmp_path):
  from pf_jax.analysis import figure2  # pylint: disable=g-import-not-at-top

  workdirs = []
  for i, m in enumerate((1, 2, 4, 8, 16, 32)):
    for perturbation in ("steep", "obf"):
      workdirs.append(str(tmp_path / f"{perturbation}-{m}"))
      # Accuracy rises with forgetting (tau +1) and with the task-information loss (so tau -1
      # with the change rel_theta - rel_theta^p < 0), and falls with sharpness (tau -1).
      _fake_run(
        workdirs[-1],
        perturbation=perturbation,
        m=m,
        seed=0,
        accuracy=0.5 + 0.05 * i,
        sharpness=10.0 - i,
        forget=0.1 * (i + 1),
      )
  results = figure2.figure2(workdirs, str(tmp_path / "out"), num_permutations=999)
  assert sorted(results) == ["SAM OBF lambda=0.333 gamma=1", "SAM STEEP"]
  for r in results.values():
    inner = slice(0, -1)  # at a = 1 the curves are 0 for every run: tau undefined
    np.testing.assert_allclose(r["tau_forgetting"][inner], 1.0)
    np.testing.assert_allclose(r["tau_task_information"][inner], -1.0)
    np.testing.assert_allclose(r["tau_sharpness"], -1.0)
    # 6 runs: the exact two-sided p of a perfect ranking is 2/720; +1-corrected estimate.
    assert np.all(r["p_forgetting"][inner] < 0.02)
    assert np.isnan(r["tau_forgetting"][-1])
    # A perfect ranking is perfect in every bootstrap resample: a zero-width interval.
    np.testing.assert_array_equal(r["lo_forgetting"][inner], 1.0)
    np.testing.assert_array_equal(r["hi_task_information"][inner], -1.0)
    assert (r["lo_sharpness"][0], r["hi_sharpness"][0]) == (-1.0, -1.0)
  out = tmp_path / "out"
  rows = open(out / "forgetting.csv").read().splitlines()
  assert len(rows) == 1 + 2 * 101
  # figure2.md: accuracy 0.5 + 0.05 i at m = 2^i, one run each (no sd); the taus' rows, Holm
  # over the 6 p-values (2 panels x sharpness, forgetting, task information).
  md = open(out / "figure2.md").read().splitlines()
  assert "| SAM STEEP | 4 | 1 | 60.00 | – | 8.00 | – |" in md
  steep = results["SAM STEEP"]
  p6 = [r[k][0] for r in results.values() for k in ("p_sharpness", "p_any_forgetting")]
  p6 += [r["p_any_task_information"][0] for r in results.values()]
  assert steep["p_any_forgetting"][0] <= 0.02  # a perfect ranking at some threshold
  holm_f = pf_jax.analysis.paired.holm(p6)[1]  # STEEP's forgetting entry
  want = f"| SAM STEEP | 6 | -1.00 [-1.00, -1.00] | {steep['p_sharpness'][0]:.2g} | "
  line = next(x for x in md if x.startswith(want) and "| forgetting |" in x)
  assert line.endswith(
    f"| forgetting | 0.00 | +1.00 [+1.00, +1.00] | {steep['p_forgetting'][0]:.2g} "
    f"| {steep['p_any_forgetting'][0]:.2g} | {holm_f:.2g} |"
  )
  # Runs on another training dataset: their own panels, named by dataset (none are mixed).
  runs = pf_jax.analysis.pool.load_runs(workdirs[:4])
  runs[0].config["dataset"] = runs[1].config["dataset"] = "spurious_digits"
  assert {k: [r.workdir for r in v] for k, v in figure2.panels(runs).items()} == {
    "SAM STEEP on spurious_digits": [workdirs[0]],
    "SAM OBF lambda=0.333 gamma=1 on spurious_digits": [workdirs[1]],
    "SAM STEEP on digits": [workdirs[2]],
    "SAM OBF lambda=0.333 gamma=1 on digits": [workdirs[3]],
  }
  # The committed-data path: the same taus from forgetting_runs.csv alone, run folders gone.
  for w in workdirs:
    shutil.rmtree(w)
  run = subprocess.run(
    [sys.executable, "-m", "pf_jax.analysis", "forgetting", "--runs_csv",
     str(out / "forgetting_runs.csv"), "--out", str(tmp_path / "again"), "--num_permutations=999"],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr
  assert open(tmp_path / "again" / "forgetting.csv").read().splitlines() == rows
  # A CSV from before m and seed were columns: one line naming them, no traceback.
  old = tmp_path / "old.csv"
  old.write_text("panel,workdir,test_accuracy,sharpness,adjusted_threshold,forgetting,x\n")
  run = subprocess.run(
    [sys.executable, "-m", "pf_jax.analysis", "forgetting", "--runs_csv", str(old), "--out",
     str(tmp_path / "again")],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert run.returncode == 2 and run.stderr.splitlines() == [
    f"error: {old}: no column m, seed, task_information_change (a forgetting_runs.csv of `python "
    "-m pf_jax.analysis forgetting --workdirs ...` has " + ", ".join(figure2.RUN_COLUMNS) + ")"
  ]
  by_panel = figure2.read_runs_csv(str(out / "forgetting_runs.csv"))
  assert sorted(by_panel["SAM STEEP"]["m"].tolist()) == [1, 2, 4, 8, 16, 32]
  assert os.path.getsize(str(tmp_path / "out" / "figure2.png")) > 10_000


def test_report_groups_runs_that_differ_only_in_seed(tmp_path):
  from pf_jax.analysis import report  # pylint: disable=g-import-not-at-top

  runs = [
    ("steep", 8, 0, 0.90, 12.0),
    ("steep", 8, 1, 0.94, 14.0),
    ("steep", 8, 2, 0.95, None),
    ("obf", 8, 0, 0.97, 20.0),
    ("steep", 64, 0, 0.91, 30.0),
  ]
  workdirs = []
  for p, m, seed, acc, sharp in runs:
    workdirs.append(str(tmp_path / f"{p}-{m}-{seed}"))
    _fake_run(
      workdirs[-1], perturbation=p, m=m, seed=seed, accuracy=acc, sharpness=sharp, forget=0.0
    )
  table = report.report(workdirs, str(tmp_path / "out")).splitlines()
  assert table[0] == "| MODEL | DATASET | ALGO | PERTURB | m | DIGITS | SHARPNESS | RUNS |"
  # mean and sample std by hand: (90, 94, 95) -> 93.00 +- 2.65; sharpness (12, 14) -> 13.0 +- 1.4.
  assert "| vit_digits | digits | SAM | STEEP | 8 | 93.00 ± 2.65 | 13.0 ± 1.4 | 3 |" in table
  assert "| vit_digits | digits | SAM | STEEP | 64 | 91.00 | 30.0 | 1 |" in table
  assert "| vit_digits | digits | SAM | OBF lambda=0.333 gamma=1 | 8 | 97.00 | 20.0 | 1 |" in table
  assert len(table) == 2 + 3
  csv_rows = open(str(tmp_path / "out" / "results.csv")).read().splitlines()
  assert len(csv_rows) == 1 + 3 and "0 1 2" in csv_rows[2]


def test_report_counts_a_workdir_once_ignores_a_stale_sharpness_and_names_the_dataset(tmp_path):
  from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import report  # pylint: disable=g-import-not-at-top

  a, b, c = (str(tmp_path / n) for n in "abc")
  _fake_run(a, perturbation="steep", m=8, seed=0, accuracy=0.90, sharpness=12.0, forget=0.0)
  _fake_run(
    b,
    perturbation="steep",
    m=8,
    seed=1,
    accuracy=0.94,
    sharpness=99.0,
    forget=0.0,
    sharpness_step=60,
  )
  _fake_run(c, perturbation="steep", m=8, seed=0, accuracy=0.80, sharpness=5.0, forget=0.0)
  config = workdir_lib.load_config(c)  # the same run on another training set: its own row
  config.dataset = "spurious_digits"
  workdir_lib.save_config(c, config)
  text = report.report([a, b, a + "/", c], str(tmp_path / "out"))
  table = text.splitlines()
  # a and b: 2 runs (not 3), accuracy (90, 94) -> 92.00 +- 2.83; b's sharpness (step 60 < 660) unused.
  assert "| vit_digits | digits | SAM | STEEP | 8 | 92.00 ± 2.83 | 12.0 | 2 |" in table
  assert "| vit_digits | spurious_digits | SAM | STEEP | 8 | 80.00 | 5.00 | 1 |" in table
  assert f"Note: {b}: sharpness measured at step 60, the run ended at step 660: not used" in text
  assert f"Note: {a}/: the same workdir as {a}: counted once" in text


@pytest.mark.slow
def test_pool_runner_end_to_end_reduced(tmp_path):
  """launch/forgetting_pool.py on 4 short runs: training with collection, sharpness, Figure 2,
  table; then a rerun skips everything finished; then the sharpness CLI's output and errors."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  pool_root = str(tmp_path / "pool")
  cmd = [
    sys.executable,
    "launch/forgetting_pool.py",
    f"--root={pool_root}",
    "--m=4,64",
    "--perturbations=steep,obf",
    "--seeds=0",
    "--num_permutations=99",
  ] + [
    f"--override={o}"
    for o in (
      "num_train_steps=6",
      "warmup_steps=1",
      "analysis.collect_every_steps=3",
      "analysis.sharpness_examples=128",
      "eval_every_steps=6",
      f"data_dir={tmp_path / 'data'}",
    )
  ]
  env = dict(os.environ, PYTHONPATH=root)
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
  assert out.count("main.py") == 4 and out.count("pf_jax.analysis sharpness") == 4
  analysis_dir = os.path.join(pool_root, "analysis")
  assert len(open(os.path.join(analysis_dir, "forgetting.csv")).read().splitlines()) == 1 + 2 * 101
  assert os.path.getsize(os.path.join(analysis_dir, "figure2.png")) > 10_000
  table = open(os.path.join(analysis_dir, "results.md")).read()
  assert table.count("| vit_digits | digits | SAM |") == 4
  assert "LOSS" not in table  # top-1 columns only (results.json also holds the eval loss)
  again = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True).stdout
  assert "main.py" not in again and "pf_jax.analysis sharpness" not in again  # restartable
  workdir = os.path.join(pool_root, "steep-4-s0")
  value = json.load(open(os.path.join(workdir, "sharpness.json")))["sharpness"]
  assert value > 0
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "pf_jax.analysis", *a], cwd=root, env=env, capture_output=True, text=True
  )
  assert run("sharpness", f"--workdir={workdir}").stdout.strip() == f"sharpness={value:.6g}"
  # More examples than the split holds: 5 full batches of 256 of digits' 1438 (by hand), said on
  # stderr with the progress and recorded.
  more = run("sharpness", f"--workdir={workdir}", "--num_examples=2048", "--batch_size=256")
  note = "1280 of 2048 examples: the digits training split holds 1438, in full batches of 256"
  assert more.returncode == 0 and note in more.stderr and "power iterations (tol" in more.stderr
  assert json.load(open(os.path.join(workdir, "sharpness.json")))["note"] == note
  bad = run("sharpness", f"--workdir={tmp_path / 'nope'}")
  assert bad.returncode == 2 and bad.stderr.splitlines() == [
    f"error: {tmp_path / 'nope' / 'config.json'} does not exist: is '{tmp_path / 'nope'}' a pf_jax workdir?"
  ]


def test_figure2_md_pools_the_seeds_of_each_m(tmp_path):
  """Two seeds per m: figure2.md's row is their mean and sample sd (by hand), and the runs CSV
  carries each run's m and seed."""
  from pf_jax.analysis import figure2  # pylint: disable=g-import-not-at-top

  workdirs = []
  for m, seed, acc, sharp in (
    (4, 0, 0.6, 3.0),
    (4, 1, 0.7, 5.0),
    (8, 0, 0.8, 6.0),
    (8, 1, 0.9, None),
  ):
    workdirs.append(str(tmp_path / f"steep-{m}-s{seed}"))
    _fake_run(
      workdirs[-1], perturbation="steep", m=m, seed=seed, accuracy=acc, sharpness=sharp, forget=acc
    )
  figure2.figure2(workdirs, str(tmp_path / "out"), num_permutations=9)
  md = open(tmp_path / "out" / "figure2.md").read().splitlines()
  # m 4: top-1 60, 70 -> 65.00, sd 7.07; sharpness 3, 5 -> 4.00, sd 1.41. m 8: one sharpness.
  assert "| SAM STEEP | 4 | 2 | 65.00 | 7.07 | 4.00 | 1.41 |" in md
  assert "| SAM STEEP | 8 | 2 | 85.00 | 7.07 | 6.00 | – |" in md
  back = figure2.read_runs_csv(str(tmp_path / "out" / "forgetting_runs.csv"))["SAM STEEP"]
  assert back["m"].tolist() == [4, 4, 8, 8] and back["seed"].tolist() == [0, 1, 0, 1]
  assert np.isnan(back["sharpness"][3]) and back["sharpness"][1] == 5.0


def test_figure2_marks_small_panels_and_draws_sharpness_only_where_measured(tmp_path, capsys):
  """6 steepest runs with sharpness: a result; 2 OBF runs without sharpness: drawn marked 'too few
  runs' (CSV and stderr say so), no sharpness line; 1 OBF gamma-0 run: no tau at all, drawn
  greyed and empty, with a line saying why (it was left out before issue 30)."""
  from pf_jax.analysis import figure2  # pylint: disable=g-import-not-at-top

  workdirs = []
  for i, m in enumerate((1, 2, 4, 8, 16, 32)):
    workdirs.append(str(tmp_path / f"steep-{m}"))
    _fake_run(
      workdirs[-1],
      perturbation="steep",
      m=m,
      seed=0,
      accuracy=0.5 + 0.05 * i,
      sharpness=10.0 - i,
      forget=0.1 * (i + 1),
    )
  for i, m in enumerate((4, 8)):
    workdirs.append(str(tmp_path / f"obf-{m}"))
    _fake_run(
      workdirs[-1], perturbation="obf", m=m, seed=0, accuracy=0.6 + 0.1 * i, forget=0.1 * (i + 1)
    )
  workdirs.append(str(tmp_path / "gamma0-8"))
  _fake_run(workdirs[-1], perturbation="obf_gamma0", m=8, seed=0, accuracy=0.7, forget=0.2)
  results = figure2.figure2(workdirs, str(tmp_path / "out"), num_permutations=99)
  err = capsys.readouterr().err.splitlines()
  obf = "SAM OBF lambda=0.333 gamma=1"
  gamma0 = "SAM OBF lambda=0.333 gamma=0"
  assert sorted(results) == [gamma0, obf, "SAM STEEP"]
  assert sorted(err) == [
    f"note: panel '{gamma0}' has no Kendall tau: 1 run: a rank correlation needs at least 2 "
    "runs (and 4 to count as a result); drawn greyed, the runs' measures are in "
    f"{tmp_path / 'out' / 'forgetting_runs.csv'}",
    f"note: panel '{obf}' has 2 runs (< 4): drawn marked 'too few runs', not a result",
  ]
  assert results[gamma0]["drawn"] == (f"{gamma0} (1 run, too few, no τ)", [])
  title, labels = results[obf]["drawn"]
  assert title == f"{obf} (2 runs, too few)" and not any("sharpness" in l for l in labels)
  title, labels = results["SAM STEEP"]["drawn"]
  assert title == "SAM STEEP (6 runs)" and "sharpness" in labels
  rows = [l.split(",") for l in open(str(tmp_path / "out" / "forgetting.csv")).read().splitlines()]
  assert rows[0][:4] == ["panel", "adjusted_threshold", "runs", "too_few_runs"]
  assert {(r[0], r[2], r[3]) for r in rows[1:]} == {
    (gamma0, "1", "1"),
    (obf, "2", "1"),
    ("SAM STEEP", "6", "0"),
  }


def test_forgetting_of_one_run_writes_its_table_and_a_greyed_figure(tmp_path):
  """Issue 30: `forgetting` on one run stopped with "no panel has a defined tau" and wrote
  nothing. Now it writes the per-run table, the greyed figure and says why tau is missing. The
  run's perturbed curve is (1 - f) x the unperturbed one, so its forgetting at adjusted threshold
  a is f x cond(a) / max cond = f (1 - a) (by the definition of the adjusted threshold)."""
  workdir, out = str(tmp_path / "run"), tmp_path / "out"
  _fake_run(workdir, perturbation="obf", m=8, seed=0, accuracy=0.9, forget=0.2)
  run = subprocess.run(
    [sys.executable, "-m", "pf_jax.analysis", "forgetting", "--workdirs", workdir, "--out",
     str(out), "--num_permutations=9"],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr
  assert run.stderr.splitlines() == [
    "note: panel 'SAM OBF lambda=0.333 gamma=1' has no Kendall tau: 1 run: a rank correlation "
    "needs at least 2 runs (and 4 to count as a result); drawn greyed, the runs' measures are in "
    f"{out / 'forgetting_runs.csv'}"
  ]
  assert run.stdout.startswith(f"wrote {out / 'forgetting_runs.csv'}, ")
  with open(out / "forgetting_runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 101 and {r["workdir"] for r in rows} == {workdir}
  a = np.array([float(r["adjusted_threshold"]) for r in rows])
  np.testing.assert_allclose([float(r["forgetting"]) for r in rows], 0.2 * (1 - a), atol=2e-3)
  assert {r["test_accuracy"] for r in rows} == {"0.9"}
  assert os.path.getsize(out / "figure2.png") > 10_000


def test_a_rerun_that_turns_collection_on_says_what_it_cannot_collect(tmp_path):
  """Issue 30: a finished run run again with analysis.collect_every_steps set printed done and
  collected nothing, silently. The warning names the steps that cannot be collected any more."""
  from pf_jax.analysis import collect  # pylint: disable=g-import-not-at-top

  w = str(tmp_path)
  assert collect.missed_note(w, None, 110, 110) is None  # collection off
  assert collect.missed_note(w, 50, 0, 110) is None  # a fresh run collects everything
  note = collect.missed_note(w, 50, 110, 110)  # finished: steps 50, 100 missed, none left
  assert note == (
    "config.analysis.collect_every_steps=50: this run was at step 110 of 110 before it was set, "
    "and the outputs of 2 steps (50..100) cannot be collected afterwards (they need the state of "
    "those steps); nothing is left to collect. For the analysis of every step, train it afresh "
    "with this setting in a new --workdir"
  )
  collect.save_point(w, {"step": np.int64(50), "cond": np.zeros(3)})  # collected before
  assert "outputs of step 100 cannot be collected" in collect.missed_note(w, 50, 110, 110)
  assert "; only its last step, 100, is collected." in collect.missed_note(w, 25, 100, 100)
  assert "only the steps from 60 on are collected" in collect.missed_note(w, 20, 60, 110)
  assert collect.missed_note(w, 50, 50, 110) is None  # step 50 has its point


def _fake_events(workdir, losses):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  writer = metric_writers.create_default_writer(workdir)
  for step, loss in enumerate(losses, 1):
    writer.write_scalars(step, {"train/loss": loss, "eval/digits/top1": 1.0 - loss})
  writer.close()


def test_report_plots_label_runs_uniquely_from_a_stated_baseline(tmp_path):
  """Rows differing in m or OBF's lambda get their own labels; bars start at a multiple of 10 below
  the lowest bar (mean - std: 91 - 0 -> 90, by hand); `report --plots` writes nothing on stderr."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from pf_jax.analysis import plots  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import report  # pylint: disable=g-import-not-at-top

  workdirs = []
  for p, m, acc in (("steep", 8, 0.97), ("steep", 64, 0.91), ("obf", 8, 0.95)):
    workdirs.append(str(tmp_path / f"{p}-{m}"))
    _fake_run(workdirs[-1], perturbation=p, m=m, seed=0, accuracy=acc, forget=0.0)
    _fake_events(workdirs[-1], [0.5, 0.3])
  rows, _ = report.table(pf_jax.analysis.pool.load_runs(workdirs))
  assert sorted(plots.row_labels(rows)) == [
    "SAM OBF lambda=0.333 gamma=1 m=8",
    "SAM STEEP m=64",
    "SAM STEEP m=8",
  ]
  steep8 = next(r for r in rows if plots.row_label(r) == "SAM STEEP m=8")
  same = [dict(steep8, model="a"), dict(steep8, model="b"), dict(steep8, model="b")]
  assert plots.row_labels(same) == [
    "SAM STEEP m=8 a",
    "SAM STEEP m=8 b #1",
    "SAM STEEP m=8 b #2",
  ]
  mixed = [steep8, dict(steep8, dataset="spurious_digits"), dict(steep8, dataset="x", model="b")]
  assert plots.row_labels(mixed) == [
    "SAM STEEP m=8 on digits",
    "SAM STEEP m=8 on spurious_digits",
    "SAM STEEP m=8 on x",
  ]
  assert plots.baseline(91.0) == 90.0 and plots.baseline(90.0) == 80.0 and plots.baseline(3) == 0
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-m", "pf_jax.analysis", "report", "--plots", "--out", str(tmp_path / "o")]
    + ["--workdirs", *workdirs],
    cwd=root,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0 and out.stderr == "", out.stderr
  assert os.path.getsize(str(tmp_path / "o" / "curves.png")) > 10_000


def test_every_analysis_option_has_a_help_line():
  import argparse  # pylint: disable=g-import-not-at-top

  from pf_jax.analysis import __main__ as cli  # pylint: disable=g-import-not-at-top

  parser = cli.build_parser()
  commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
  assert sorted(commands.choices) == ["forgetting", "report", "sharpness"]
  for name, sub in commands.choices.items():
    for action in sub._actions:
      if not isinstance(action, argparse._HelpAction):
        assert action.help, (name, action.option_strings)


def test_checkpoint_sharpness_is_the_top_eigenvalue_of_a_known_hessian(tmp_path, monkeypatch):
  """A linear model z = W x + b under the sigmoid loss (mean over examples, sum over classes) has
  the block-diagonal Hessian H_c = mean_i s_ic (1 - s_ic) [x_i; 1] [x_i; 1]^T, s = sigmoid(z):
  the sharpness of its checkpoint is the largest eigenvalue of any block (numpy's eigh)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from pf_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from pf_jax import models  # pylint: disable=g-import-not-at-top
  from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import sharpness  # pylint: disable=g-import-not-at-top

  class Linear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(self.num_classes, name="head")(x.reshape((x.shape[0], -1)))

  monkeypatch.setattr(models, "build_model", lambda name, **kw: Linear(kw["num_classes"]))
  c = _tiny_digits_config("steepest", 4)
  c.data_dir = str(tmp_path / "data")
  assert c.loss == "sigmoid_xent" and c.label_smoothing == 0
  workdir = tmp_path / "run"
  rng = np.random.default_rng(0)
  w = (0.05 * rng.normal(size=(8 * 8 * 3, 10))).astype(np.float32)
  # Class 0 near s = 1/2 (curvature 1/4), the others near s = 0.02: one block dominates, so the
  # power iteration converges fast (close top eigenvalues of several blocks would not).
  b = np.array([0.0] + [-4.0] * 9, np.float32)
  with ocp.CheckpointManager(
    workdir / "checkpoints", options=ocp.CheckpointManagerOptions(create=True)
  ) as mngr:
    checkpointing.save(
      mngr, 7, {"step": jnp.int32(7), "params": {"head": {"kernel": w, "bias": b}}}
    )
  workdir_lib.save_config(str(workdir), c)

  got = sharpness.checkpoint_sharpness(
    str(workdir), num_examples=128, batch_size=64, tol=1e-7, num_iters=300
  )
  images = sharpness.training_batches(c, 128, 64)["image"].reshape(128, -1).astype(np.float64)
  x1 = np.concatenate([images, np.ones((128, 1))], axis=1)
  s = 1 / (1 + np.exp(-(images @ w + b)))
  curv = s * (1 - s)  # [examples, classes]
  top = max(np.linalg.eigvalsh((x1 * curv[:, [k]]).T @ x1 / 128)[-1] for k in range(10))
  assert got["step"] == 7 and got["num_examples"] == 128
  np.testing.assert_allclose(got["sharpness"], top, rtol=1e-3)
