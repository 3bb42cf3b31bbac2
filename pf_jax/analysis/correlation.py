"""Rank correlation of a measure with accuracy across a pool of runs (Section 6.1, Figure 2).

The permutation and bootstrap functions take the measure at many thresholds at once, `ys`
[runs, k], with the same draws for every column (Figure 2 ranks 101 thresholds per panel).
"""

import numpy as np


def _pair_signs(v: np.ndarray) -> np.ndarray:
  """sign(v_i - v_j) for i < j, along the last axis."""
  i, j = np.triu_indices(v.shape[-1], k=1)
  return np.sign(v[..., i] - v[..., j])


def kendall_tau(x, y) -> float:
  """Kendall's tau-b (ties corrected), equal to `scipy.stats.kendalltau(x, y).statistic`.

  tau_b = sum_{i<j} s_ij t_ij / sqrt(sum s_ij^2 * sum t_ij^2), s = sign(x_i - x_j),
  t = sign(y_i - y_j); NaN when either variable is constant (or there are < 2 points).
  """
  x, y = _check(x, y)
  s, t = _pair_signs(x), _pair_signs(y)
  denom = np.sqrt(np.sum(s * s) * np.sum(t * t))
  return float(np.sum(s * t) / denom) if denom > 0 else float("nan")


def permutation_pvalues(
  x, ys, *, num_permutations: int = 10_000, seed: int = 0
) -> tuple[np.ndarray, float]:
  """Two-sided permutation p-values of Kendall's tau of x with each column of ys [n, k], and the
  family-wise p-value of the largest |tau| over the columns.

  Each permutation perm (`np.argsort(rng.random((b, n)), axis=1)` in batches of 1000, `rng =
  np.random.default_rng(seed)`) permutes the rows of ys together: p_j = P(|tau(x, ys[perm, j])|
  >= |tau(x, ys[:, j])|), and "some column correlates" (Section 6.1's "there exist thresholds")
  is one hypothesis, P(max_j |tau(x, ys[perm, j])| >= max_j |tau(x, ys[:, j])|), so choosing the
  column afterwards is paid for. Estimated as (1 + #{at least as extreme}) / (1 +
  num_permutations), a valid p-value (never 0). Columns whose tau is undefined get NaN and are
  left out of the maximum (NaN if all are).
  """
  ys = _columns(ys)
  x, _ = _check(x, ys[:, 0])
  s, t = _pair_signs(x), _pair_signs(ys.T)  # [pairs], [k, pairs]
  norm = np.sqrt(np.sum(s * s) * np.sum(t * t, axis=1))  # [k], permutation-invariant
  keep = norm > 0
  p = np.full(ys.shape[1], np.nan)
  if not keep.any():
    return p, float("nan")
  t, norm = t[keep], norm[keep]
  observed = np.abs(t @ s) / norm  # [k]
  rng = np.random.default_rng(seed)
  extreme, extreme_max = np.zeros(len(norm), np.int64), 0
  for start in range(0, num_permutations, 1000):
    perms = np.argsort(rng.random((min(1000, num_permutations - start), x.shape[0])), axis=1)
    # tau(x, y[perm]) = tau(x[perm^-1], y): permute x once instead of every column.
    taus = np.abs(_pair_signs(x[np.argsort(perms, axis=1)]) @ t.T) / norm  # [b, k]
    extreme += np.sum(taus >= observed - 1e-12, axis=0)
    extreme_max += int(np.sum(taus.max(axis=1) >= observed.max() - 1e-12))
  p[keep] = (1 + extreme) / (1 + num_permutations)
  return p, (1 + extreme_max) / (1 + num_permutations)


def permutation_pvalue(x, y, *, num_permutations: int = 10_000, seed: int = 0) -> float:
  """Two-sided permutation p-value of Kendall's tau: P(|tau(x, perm(y))| >= |tau(x, y)|);
  `permutation_pvalues` with one column. NaN when tau is undefined."""
  return float(permutation_pvalues(x, y, num_permutations=num_permutations, seed=seed)[0][0])


def bootstrap_intervals(
  x, ys, *, num_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> np.ndarray:
  """Percentile bootstrap intervals [k, 2] of Kendall's tau-b of x with each column of ys: the
  runs resampled with replacement, `np.random.default_rng(seed).integers(0, n, (num_resamples,
  n))`, the same resamples for every column. Resamples where tau is undefined (a constant
  variable) are dropped; NaN where the data's own tau is undefined.
  """
  ys = _columns(ys)
  x, _ = _check(x, ys[:, 0])
  idx = np.random.default_rng(seed).integers(0, x.shape[0], (num_resamples, x.shape[0]))
  s = _pair_signs(x[idx])  # [resamples, pairs]
  out = np.full((ys.shape[1], 2), np.nan)
  for j in range(ys.shape[1]):
    if np.isnan(kendall_tau(x, ys[:, j])):
      continue
    t = _pair_signs(ys[idx, j])
    denom = np.sqrt(np.sum(s * s, axis=1) * np.sum(t * t, axis=1))
    defined = denom > 0
    taus = np.sum(s * t, axis=1)[defined] / denom[defined]
    out[j] = np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])
  return out


def _columns(ys) -> np.ndarray:
  """A measure as [n, k]: one column for a vector."""
  ys = np.asarray(ys, np.float64)
  return ys.reshape(-1, 1) if ys.ndim < 2 else ys


def _check(x, y):
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
  return x, y
