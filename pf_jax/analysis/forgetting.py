"""Adjusted thresholds and perturbed forgetting (paper Section 6.1).

Per collection point, from the information curves of `information.binned_information` at the
thresholds 10^r (r = `THRESHOLD_EXPONENTS`) at theta and at theta^p:

1. Normalize the unperturbed I(X; B|Y) curve by its maximum M (so its peak is 1).
2. Past the peak (r >= r_peak), take the non-increasing envelope of the normalized curve
   (running minimum), which the paper's "decreases ... from 1 to 0" assumes; at r = 0 every
   likelihood is <= 1, so all examples share one bin and the curve is exactly 0 there.
3. Invert it: adjusted threshold a in [0, 1] maps to the smallest r where the envelope reaches
   1 - a, linearly interpolated in r. So at every adjusted threshold the unperturbed normalized
   curve has the same value 1 - a, for every checkpoint ("resampling" in the paper).
4. At those r, forgetting = (cond_theta - cond_theta^p) / M and the task-information change
   = (rel_theta - rel_theta^p) / max_r(rel_theta), the curves linearly interpolated in r.

A run's measures are these curves averaged over its collection points. Readings of the paper we
had to make: the envelope in step 2 (the paper states the curve is monotone past its peak; real
curves have small plateaus and wiggles, and the inverse needs a monotone function); "smallest r"
on plateaus; the task-information change normalized by its own unperturbed maximum (the paper does
not say); a point whose unperturbed curve is identically 0 (all examples in one bin at every
threshold, e.g. a constant model) has no adjusted thresholds and is left out of the average.
"""

import warnings

import numpy as np

from pf_jax.analysis import information

NUM_ADJUSTED = 101
ADJUSTED_THRESHOLDS = np.linspace(0.0, 1.0, NUM_ADJUSTED)


def adjusted_exponents(
  cond, exponents=information.THRESHOLD_EXPONENTS, adjusted=ADJUSTED_THRESHOLDS
) -> np.ndarray:
  """r(a) for each adjusted threshold a (steps 1-3 of the module doc); NaN if cond is all 0."""
  cond = np.asarray(cond, np.float64)
  exponents = np.asarray(exponents, np.float64)
  peak = int(np.argmax(cond))
  if not cond[peak] > 0:
    return np.full(np.shape(adjusted), np.nan)
  envelope = np.minimum.accumulate(cond[peak:] / cond[peak])
  r = exponents[peak:]
  out = np.empty(np.shape(adjusted))
  for i, level in enumerate(1.0 - np.asarray(adjusted, np.float64)):
    k = int(np.argmax(envelope <= level)) if np.any(envelope <= level) else len(envelope) - 1
    if k == 0 or envelope[k] > level:  # the peak itself, or a level the curve never reaches
      out[i] = r[k]
    else:
      frac = (envelope[k - 1] - level) / (envelope[k - 1] - envelope[k])
      out[i] = r[k - 1] + frac * (r[k] - r[k - 1])
  return out


def point_measures(
  cond, rel, cond_p, rel_p, exponents=information.THRESHOLD_EXPONENTS, adjusted=ADJUSTED_THRESHOLDS
) -> tuple:
  """(forgetting, task-information change) at each adjusted threshold for one collection point."""
  r_a = adjusted_exponents(cond, exponents, adjusted)
  if np.isnan(r_a).all():
    nan = np.full(np.shape(adjusted), np.nan)
    return nan, nan
  at = lambda curve: np.interp(r_a, exponents, np.asarray(curve, np.float64))
  cond_max = np.max(cond)
  rel_max = np.max(rel)
  forgetting = (at(cond) - at(cond_p)) / cond_max
  task = (at(rel) - at(rel_p)) / rel_max if rel_max > 0 else np.full(np.shape(adjusted), np.nan)
  return forgetting, task


def run_measures(
  points, exponents=information.THRESHOLD_EXPONENTS, adjusted=ADJUSTED_THRESHOLDS
) -> tuple:
  """A run's (forgetting, task change) curves: the mean over its collection points.

  `points`: iterable of mappings with "cond", "rel", "cond_p", "rel_p" (see `collect.py`).
  Points without adjusted thresholds are skipped (NaN-mean); no usable point gives NaN curves.
  """
  measures = [
    point_measures(p["cond"], p["rel"], p["cond_p"], p["rel_p"], exponents, adjusted)
    for p in points
  ]
  if not measures:
    raise ValueError("no collection points with a perturbation")
  forgetting = np.stack([m[0] for m in measures])
  task = np.stack([m[1] for m in measures])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
    return np.nanmean(forgetting, axis=0), np.nanmean(task, axis=0)
