"""pf_jax.analysis.paired against textbook values and scipy computed here on hand-built data."""

import math

import numpy as np
import pytest
from absl.testing import parameterized
from scipy import stats

from pf_jax.analysis import paired


class PowerTest(parameterized.TestCase):
  @parameterized.parameters(
    # Normal approximation, by hand: z_.975 = 1.959964, z_.8 = 0.841621, (z sum)^2 = 7.8489.
    (1.0, 1.0, 8),  # 7.85 -> 8
    (1.0, 0.5, 32),  # 31.40 -> 32
    (4.26, 2.0, 36),  # 7.8489 * 2.13^2 = 35.61 -> 36
    (1.47, 1.0, 17),  # 7.8489 * 1.47^2 = 16.96 -> 17
  )
  def test_normal_approximation(self, sd, delta, want):
    self.assertEqual(paired.normal_pairs(sd, delta), want)
    self.assertAlmostEqual((1.959964 + 0.841621) ** 2 * (sd / delta) ** 2, want, delta=1.0)

  @parameterized.parameters(
    (1.0, 1.0, 10),  # paired t, d = 1, alpha .05, power .8: 10 pairs (Cohen 1988; G*Power)
    (1.0, 0.5, 34),  # d = 0.5: 34 pairs (G*Power)
  )
  def test_textbook_t_values(self, sd, delta, want):
    self.assertEqual(paired.required_pairs(sd, delta), want)

  @parameterized.parameters((1.47, 1.0), (4.26, 2.0), (0.7, 1.0), (3.0, 0.5))
  def test_smallest_n_by_scipy_noncentral_t(self, sd, delta):
    """Power computed here from scipy's noncentral t: >= 0.8 at n, < 0.8 at n - 1."""

    def power(n):
      df, ncp = n - 1, delta * math.sqrt(n) / sd
      crit = stats.t.ppf(0.975, df)
      return 1 - stats.nct.cdf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp)

    n = paired.required_pairs(sd, delta)
    self.assertGreaterEqual(power(n), 0.8)
    if n > 2:
      self.assertLess(power(n - 1), 0.8)
    self.assertGreaterEqual(n, paired.normal_pairs(sd, delta))  # the t-test needs more

  def test_large_effect_needs_few_pairs(self):
    # sd/delta = 0.2: power(3) = 0.975 by the noncentral t; n = 2 has 1 degree of freedom and
    # critical value 12.7 against a noncentrality of 7.1: power 0.42.
    self.assertEqual(paired.required_pairs(0.2, 1.0), 3)
    self.assertAlmostEqual(paired.t_power(30, 1.47, 5.0), 1.0)  # scipy's nan tail is 0 here

  def test_bad_inputs_refused(self):
    with self.assertRaisesRegex(ValueError, "sd > 0"):
      paired.required_pairs(0.0, 1.0)


class SummaryTest(parameterized.TestCase):
  def test_against_scipy_ttest_rel_and_by_hand(self):
    a = np.array([96.1, 95.3, 97.2, 96.0, 95.8, 96.9])
    b = np.array([96.5, 95.0, 97.9, 96.6, 96.3, 96.9])
    s = paired.summarize(b - a)
    d = b - a  # 0.4, -0.3, 0.7, 0.6, 0.5, 0.0
    self.assertAlmostEqual(s.mean, 1.9 / 6)
    self.assertAlmostEqual(s.p_t, stats.ttest_rel(b, a).pvalue)
    half = stats.t.ppf(0.975, 5) * np.std(d, ddof=1) / math.sqrt(6)
    self.assertAlmostEqual(s.lo, 1.9 / 6 - half)
    self.assertAlmostEqual(s.hi, 1.9 / 6 + half)
    self.assertEqual((s.wins, s.losses, s.ties), (4, 1, 1))
    self.assertAlmostEqual(s.p_sign, 12 / 32)  # 2 * P(Bin(5, 1/2) <= 1) = 2 * 6/32
    self.assertAlmostEqual(s.p_wilcoxon, stats.wilcoxon([0.4, -0.3, 0.7, 0.6, 0.5]).pvalue)

  def test_one_seed_has_no_interval(self):
    s = paired.summarize([1.5])
    self.assertEqual((s.n, s.mean, s.wins), (1, 1.5, 1))
    self.assertTrue(math.isnan(s.lo) and math.isnan(s.p_t))

  def test_split_half_agree_and_disagree(self):
    rng = np.random.RandomState(0)
    agree = paired.split_half(np.concatenate([2 + 0.1 * rng.randn(5), 2 + 0.1 * rng.randn(5)]))
    self.assertTrue(agree.agree)
    self.assertLess(agree.first.p_t, 1e-6)
    # First half clearly positive, second half clearly negative: halves disagree in sign.
    h = paired.split_half([2.0, 2.1, 1.9, 2.2, -2.0, -2.1, -1.9, -2.2])
    self.assertEqual((h.first.n, h.second.n), (4, 4))
    self.assertFalse(h.same_sign)
    self.assertTrue(h.same_significance)
    self.assertFalse(h.agree)
    # Same sign, but only one half significant.
    h = paired.split_half([2.0, 2.1, 1.9, 2.2, 3.0, -1.0, 2.5, 0.1])
    self.assertTrue(h.same_sign and not h.same_significance)
    self.assertAlmostEqual(h.second.p_t, stats.ttest_1samp([3.0, -1.0, 2.5, 0.1], 0).pvalue)

  def test_table_pairs_by_seed(self):
    metric = "eval/digits/top1"
    results = {
      "steep": {s: {metric: 0.9 + 0.01 * s} for s in range(6)},
      "obf": {s: {metric: 0.905 + 0.01 * s} for s in range(5)},  # seed 5 missing: unpaired
    }
    seeds, d = paired.paired_diffs(results, "steep", "obf", metric)
    self.assertEqual(seeds, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(d, 0.5)
    lines, rows = paired.comparison_table(results, [("OBF − STEEP", "steep", "obf")], [metric])
    self.assertLen(rows, 1)
    self.assertEqual(rows[0][2].wins, 5)
    self.assertIn("| OBF − STEEP | digits | 5 | +0.50 |", lines[2])


def test_interval_plot(tmp_path):
  metric = "eval/x/top1"
  rows = [("a", metric, paired.summarize([1.0, 2.0, 1.5]), None)]
  rows.append(("b", metric, paired.summarize([-1.0, 0.5, 0.0]), None))
  paired.interval_plot(rows, str(tmp_path / "p.png"), "t")
  assert (tmp_path / "p.png").stat().st_size > 5_000


def test_holm_by_hand():
  # Sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> kept at
  # the running maximum 0.06); nan stays out of the family (m = 4).
  got = paired.holm([0.01, 0.04, float("nan"), 0.03, 0.005])
  np.testing.assert_allclose(got[:2] + got[3:], [0.03, 0.06, 0.06, 0.02])
  assert math.isnan(got[2])
  assert paired.holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
  assert paired.holm([0.2]) == [0.2]


def _t4_cdf(t):
  """Student t CDF with 4 degrees of freedom in closed form (no scipy)."""
  u = t / math.sqrt(1 + t * t / 4)
  return 0.5 + 3 / 8 * u * (1 - t * t / (12 * (1 + t * t / 4)))


@pytest.mark.parametrize("margin", [1.0, 0.3, 0.1])
def test_tost_by_hand(margin):
  d = [0.1, -0.2, 0.3, 0.0, 0.2]  # mean 0.08, sd sqrt(0.148 / 4), n 5
  se = math.sqrt(0.148 / 4) / math.sqrt(5)
  want = max(1 - _t4_cdf((0.08 + margin) / se), _t4_cdf((0.08 - margin) / se))
  e = paired.tost(d, margin)
  assert e.p == pytest.approx(want, rel=1e-9)
  half = 2.131847 * se  # t_{0.95, 4}
  assert (e.lo90, e.hi90) == (
    pytest.approx(0.08 - half, abs=1e-6),
    pytest.approx(0.08 + half, abs=1e-6),
  )
  # Equivalence at 5% exactly when the 90% interval lies inside the margin.
  assert (e.p < 0.05) == (-margin < e.lo90 and e.hi90 < margin)


def test_tost_refuses_a_bad_margin_and_needs_two_seeds():
  with pytest.raises(ValueError, match="margin"):
    paired.tost([1.0, 2.0], 0.0)
  assert math.isnan(paired.tost([1.0], 1.0).p)


if __name__ == "__main__":
  pytest.main([__file__])
