"""Paired comparisons over seeds: power (how many seeds), intervals, tests, split-half check.

Two methods trained with the same seeds give per-seed differences d_1..d_n (e.g. OBF − STEEP
top-1, in points). Everything here is about the mean of d:

* `required_pairs(sd, delta)`: the smallest n for which a two-sided paired t-test at level alpha
  detects a true mean difference `delta` with probability `power` when the differences have
  standard deviation `sd`. Exact: power(n) = P(|T| > t_{1-a/2, n-1}) with T noncentral t
  (n − 1 degrees of freedom, noncentrality delta·sqrt(n)/sd). Its normal approximation
  n ≈ ((z_{1-a/2} + z_power)·sd/delta)² (`normal_pairs`) is the usual starting point and a few
  pairs too small at small n.
* `summarize(d)`: mean, sd, 95% t interval, paired t-test p (= scipy.stats.ttest_rel), Wilcoxon
  signed-rank p, sign-test p, wins / losses / ties.
* `split_half(d)`: the same on the first and second half of the seeds; do they agree in sign and
  in significance?
* `holm(ps)`: Holm's step-down adjustment of a family of p-values (controls the family-wise error
  rate at alpha for any dependence; never less powerful than Bonferroni).
* `tost(d, margin)`: two one-sided paired t-tests of |mean| < margin, the test behind a "no
  difference larger than margin" claim (margin fixed before the data are seen).

Example:
  >>> required_pairs(sd=1.0, delta=1.0)  # effect size 1: the textbook 10 pairs
  10
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats


def normal_pairs(sd: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
  """n = ceil(((z_{1-alpha/2} + z_power)·sd/delta)²), the normal approximation (known sd)."""
  z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
  return math.ceil((z * sd / delta) ** 2)


def t_power(n: int, sd: float, delta: float, alpha: float = 0.05) -> float:
  """Power of the two-sided paired t-test with n pairs (noncentral t, df = n − 1)."""
  df, ncp = n - 1, delta * math.sqrt(n) / sd
  crit = stats.t.ppf(1 - alpha / 2, df)
  wrong_side = stats.nct.cdf(-crit, df, ncp)  # ~0 for delta > 0; scipy gives nan at large ncp
  return float(stats.nct.sf(crit, df, ncp) + np.nan_to_num(wrong_side, nan=0.0))


def required_pairs(sd: float, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
  """Smallest n ≥ 2 with `t_power(n) ≥ power`, searched upward from the normal approximation.

  Args:
    sd: standard deviation of the per-seed differences (points).
    delta: the true mean difference to detect (points).
    alpha: two-sided level.
    power: probability of rejecting when the mean difference is delta.
  Returns:
    The number of pairs (seeds).
  """
  if not (sd > 0 and delta > 0 and 0 < alpha < 1 and 0 < power < 1):
    raise ValueError(f"need sd > 0, delta > 0, alpha and power in (0, 1); got {sd, delta, alpha}")
  n = max(2, normal_pairs(sd, delta, alpha, power) - 1)
  while t_power(n, sd, delta, alpha) < power:  # power grows with n; the t-test needs more
    n += 1
  while n > 2 and t_power(n - 1, sd, delta, alpha) >= power:
    n -= 1
  return n


@dataclasses.dataclass(frozen=True)
class Summary:
  """A paired difference over n seeds.

  Attributes:
    n: number of pairs (seeds).
    mean: mean difference.
    sd: standard deviation of the differences (ddof = 1; nan when n < 2).
    lo, hi: 95% t confidence interval of the mean (nan when n < 2).
    p_t: two-sided paired t-test p-value (nan when n < 2 or all differences equal).
    p_wilcoxon: two-sided Wilcoxon signed-rank p-value (zeros dropped; nan if all are zero).
    p_sign: two-sided exact sign-test p-value on wins vs losses (ties dropped).
    wins, losses, ties: seeds where the difference is > 0, < 0, == 0.
  """

  n: int
  mean: float
  sd: float
  lo: float
  hi: float
  p_t: float
  p_wilcoxon: float
  p_sign: float
  wins: int
  losses: int
  ties: int

  def significant(self, alpha: float = 0.05) -> bool:
    return bool(self.p_t < alpha)


def summarize(diffs, confidence: float = 0.95) -> Summary:
  """Mean, t interval and tests of per-seed differences (1-D, at least one value)."""
  d = np.asarray(diffs, np.float64).ravel()
  n = len(d)
  if n == 0:
    raise ValueError("no differences to summarize")
  mean = float(d.mean())
  wins, losses = int((d > 0).sum()), int((d < 0).sum())
  nan = float("nan")
  sd = lo = hi = p_t = p_w = nan
  if n > 1:
    sd = float(d.std(ddof=1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if sd > 0:
      p_t = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
  if wins + losses:
    p_w = float(stats.wilcoxon(d[d != 0]).pvalue) if wins + losses > 1 else 1.0
  p_sign = float(stats.binomtest(wins, wins + losses).pvalue) if wins + losses else nan
  return Summary(n, mean, sd, lo, hi, p_t, p_w, p_sign, wins, losses, n - wins - losses)


@dataclasses.dataclass(frozen=True)
class SplitHalf:
  """The seeds' first half (in the given order) against the second half."""

  first: Summary
  second: Summary
  same_sign: bool  # both means > 0, or both < 0
  same_significance: bool  # both p_t < alpha, or both not

  @property
  def agree(self) -> bool:
    return self.same_sign and self.same_significance


def split_half(diffs, alpha: float = 0.05) -> SplitHalf:
  """Summaries of the first floor(n/2) and the remaining differences, and whether they agree."""
  d = np.asarray(diffs, np.float64).ravel()
  if len(d) < 4:
    raise ValueError(f"a split-half check needs at least 4 seeds, got {len(d)}")
  a, b = summarize(d[: len(d) // 2]), summarize(d[len(d) // 2 :])
  return SplitHalf(
    a,
    b,
    same_sign=bool(np.sign(a.mean) == np.sign(b.mean) != 0),
    same_significance=a.significant(alpha) == b.significant(alpha),
  )


def holm(pvalues) -> list[float]:
  """Holm-adjusted p-values, in the input order (nan entries stay nan, outside the family).

  With the m finite p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of p_(i)
  is max over j <= i of min(1, (m − j + 1) · p_(j)); rejecting where it is < alpha keeps the
  family-wise error rate at alpha (Holm 1979).
  """
  p = np.asarray(pvalues, np.float64).ravel()
  out = np.full(p.shape, np.nan)
  idx = np.flatnonzero(~np.isnan(p))
  m = len(idx)
  order = idx[np.argsort(p[idx], kind="stable")]
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    out[i] = running
  return [float(v) for v in out]


@dataclasses.dataclass(frozen=True)
class Equivalence:
  """TOST of a paired mean difference against (−margin, +margin).

  Attributes:
    margin: the equivalence margin (points), fixed in advance.
    p: max of the two one-sided p-values; equivalence is shown at level a when p < a.
    lo90, hi90: the 90% t interval (inside ±margin exactly when p < 0.05).
  """

  margin: float
  p: float
  lo90: float
  hi90: float


def tost(diffs, margin: float) -> Equivalence:
  """Two one-sided t-tests: H0 mean <= −margin and H0 mean >= +margin, each at level alpha.

  t_lower = (mean + margin) / se with p_lower = P(T_{n−1} > t_lower); t_upper = (mean − margin)
  / se with p_upper = P(T_{n−1} < t_upper); p = max(p_lower, p_upper) (Schuirmann 1987).
  """
  if not margin > 0:
    raise ValueError(f"the equivalence margin must be > 0, got {margin}")
  d = np.asarray(diffs, np.float64).ravel()
  n = len(d)
  if n < 2:
    return Equivalence(margin, float("nan"), float("nan"), float("nan"))
  mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
  if se == 0:
    p = 0.0 if abs(mean) < margin else 1.0
    return Equivalence(margin, p, mean, mean)
  p_lower = stats.t.sf((mean + margin) / se, n - 1)
  p_upper = stats.t.cdf((mean - margin) / se, n - 1)
  half = stats.t.ppf(0.95, n - 1) * se
  return Equivalence(margin, float(max(p_lower, p_upper)), float(mean - half), float(mean + half))


def paired_diffs(results: dict, base: str, other: str, metric: str) -> tuple[list, np.ndarray]:
  """Seeds where both methods have `metric`, and other − base at those seeds (in points).

  Args:
    results: {method: {seed: {metric: top-1 as a fraction}}}.
    base, other: method names.
    metric: e.g. "eval/spurious_digits_ood/top1".
  Returns:
    (sorted seeds, 100 · (other − base) per seed).
  """
  a, b = results.get(base, {}), results.get(other, {})
  seeds = sorted(s for s in set(a) & set(b) if metric in a[s] and metric in b[s])
  return seeds, np.array([100 * (b[s][metric] - a[s][metric]) for s in seeds], np.float64)


def _p(p: float) -> str:
  return "–" if math.isnan(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def comparison_table(results: dict, comparisons, metrics, alpha: float = 0.05):
  """Markdown rows of every (comparison, metric) and the summaries behind them.

  Args:
    results: {method: {seed: {metric: value}}} of one benchmark.
    comparisons: (label, base method, other method) triples; the difference is other − base.
    metrics: metric keys, e.g. ("eval/digits/top1",).
    alpha: level of the significance columns.
  Returns:
    (markdown lines, [(label, metric, Summary, SplitHalf or None)]).
  """
  lines = [
    "| comparison | eval set | seeds | mean diff | 95% CI | p (t) | p (Wilcoxon) | p (sign) "
    "| wins/losses/ties | split halves (mean, p) | halves agree |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  rows = []
  for label, base, other in comparisons:
    for metric in metrics:
      _, d = paired_diffs(results, base, other, metric)
      if not len(d):
        continue
      s = summarize(d)
      h = split_half(d, alpha) if len(d) >= 4 else None
      halves = (
        f"{h.first.mean:+.2f} ({_p(h.first.p_t)}) / {h.second.mean:+.2f} ({_p(h.second.p_t)})"
        if h
        else "–"
      )
      agree = ("yes" if h.agree else "**no**") if h else "–"
      name = metric.split("/")[1] if metric.count("/") == 2 else metric
      lines.append(
        f"| {label} | {name} | {s.n} | {s.mean:+.2f} | [{s.lo:+.2f}, {s.hi:+.2f}] | {_p(s.p_t)} "
        f"| {_p(s.p_wilcoxon)} | {_p(s.p_sign)} | {s.wins}/{s.losses}/{s.ties} | {halves} "
        f"| {agree} |"
      )
      rows.append((label, metric, s, h))
  return lines, rows


def interval_plot(rows, path: str, title: str = "") -> None:
  """Paired mean differences with their 95% t intervals, one panel per eval set.

  Args:
    rows: [(label, metric, Summary, ...)] as returned by `comparison_table`.
    path: PNG to write.
    title: figure title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  metrics = list(dict.fromkeys(r[1] for r in rows))
  fig, axes = plt.subplots(
    1,
    max(1, len(metrics)),
    figsize=(4.5 * max(1, len(metrics)), 0.5 + 0.45 * len(rows)),
    squeeze=False,
  )
  for ax, metric in zip(axes[0], metrics):
    mine = [r for r in rows if r[1] == metric]
    y = np.arange(len(mine))[::-1]
    means = np.array([r[2].mean for r in mine])
    err = np.array([[r[2].mean - r[2].lo, r[2].hi - r[2].mean] for r in mine]).T
    ax.errorbar(means, y, xerr=np.nan_to_num(err), fmt="o", capsize=3, color="tab:blue")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(y, [f"{r[0]} (n={r[2].n})" for r in mine], fontsize=8)
    ax.set_title(metric.split("/")[1] if metric.count("/") == 2 else metric)
    ax.set_xlabel("difference in top-1 (points), mean and 95% CI")
    ax.grid(axis="x", alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
