"""Rank correlation of a measure with accuracy across a pool of runs (Section 6.1, Figure 2)."""

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


def permutation_pvalue(x, y, *, num_permutations: int = 10_000, seed: int = 0) -> float:
  """Two-sided permutation p-value of Kendall's tau: P(|tau(x, perm(y))| >= |tau(x, y)|).

  Estimated as (1 + #{permutations at least as extreme}) / (1 + num_permutations), which is a
  valid p-value (never 0). NaN when tau is undefined.
  """
  x, y = _check(x, y)
  observed = kendall_tau(x, y)
  if np.isnan(observed):
    return float("nan")
  rng = np.random.default_rng(seed)
  s = _pair_signs(x)
  norm = np.sqrt(np.sum(s * s) * np.sum(_pair_signs(y) ** 2))  # permutation-invariant
  extreme = 0
  for start in range(0, num_permutations, 1000):
    n = min(1000, num_permutations - start)
    perms = np.argsort(rng.random((n, y.shape[0])), axis=1)
    taus = (_pair_signs(y[perms]) @ s) / norm
    extreme += int(np.sum(np.abs(taus) >= abs(observed) - 1e-12))
  return (1 + extreme) / (1 + num_permutations)


def max_permutation_pvalue(x, ys, *, num_permutations: int = 10_000, seed: int = 0) -> float:
  """Family-wise two-sided permutation p-value of the largest |tau| of x with any column of ys.

  "Some threshold correlates" (Section 6.1) is a claim about the maximum over ys's columns: the
  rows of ys [n, k] are permuted jointly (the draws of `permutation_pvalue`, so with one column
  the two p-values are equal), max_j |tau(x, ys[perm, j])| compared with the observed maximum;
  columns whose tau is undefined are left out. NaN when every tau is undefined.
  """
  ys = np.asarray(ys, np.float64)
  x, _ = _check(x, ys[:, 0])
  s = _pair_signs(x)
  t = _pair_signs(ys.T)  # [k, pairs]
  norm = np.sqrt(np.sum(s * s) * np.sum(t * t, axis=1))  # [k], permutation-invariant
  keep = norm > 0
  if not keep.any():
    return float("nan")
  ys, t, norm = ys[:, keep], t[keep], norm[keep]
  observed = np.max(np.abs(t @ s) / norm)
  rng = np.random.default_rng(seed)
  extreme = 0
  for start in range(0, num_permutations, 1000):
    perms = np.argsort(rng.random((min(1000, num_permutations - start), x.shape[0])), axis=1)
    for chunk in np.array_split(perms, max(1, len(perms) // 100)):  # [b, k, pairs] in memory
      taus = (_pair_signs(np.swapaxes(ys[chunk], 1, 2)) @ s) / norm  # [b, k]
      extreme += int(np.sum(np.max(np.abs(taus), axis=1) >= observed - 1e-12))
  return (1 + extreme) / (1 + num_permutations)


def bootstrap_interval(
  x, y, *, num_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
  """Percentile bootstrap interval of Kendall's tau-b: the points (x_i, y_i) resampled with
  replacement, `rng.integers(0, n, (num_resamples, n))` with `np.random.default_rng(seed)`.

  Resamples where tau is undefined (a constant variable) are dropped. (NaN, NaN) when tau of the
  data is undefined.
  """
  x, y = _check(x, y)
  if np.isnan(kendall_tau(x, y)):
    return float("nan"), float("nan")
  idx = np.random.default_rng(seed).integers(0, x.shape[0], (num_resamples, x.shape[0]))
  s, t = _pair_signs(x[idx]), _pair_signs(y[idx])  # [resamples, pairs]
  denom = np.sqrt(np.sum(s * s, axis=1) * np.sum(t * t, axis=1))
  defined = denom > 0
  taus = np.sum(s * t, axis=1)[defined] / denom[defined]
  lo, hi = np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def _check(x, y):
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
  return x, y
