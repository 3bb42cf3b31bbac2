"""Binned mutual information of model outputs (paper Section 6.1, "Mutual Information Estimation").

Each example's likelihood vector is binarized at a threshold t (`probs > t`, strict) and the bit
pattern is its bin B_t. The bin is a function of the input X, so H(B_t | X) = 0 and
  I(X; B_t | Y) = H(B_t | Y)                 (superfluous, "output-exposed" information)
  I(B_t; Y)     = H(B_t) - H(B_t | Y)        (task information),
estimated with plug-in (counting) entropies in nats. Patterns are packed into bytes and counted
with `np.unique` on the packed rows: exact for any number of classes, memory O(N C / 8), and no
enumeration of the 2^C possible bins.
"""

import numpy as np

NUM_THRESHOLDS = 100
# Thresholds t = 10^r, r linearly spaced in [-12, 0] (Section 6.1).
THRESHOLD_EXPONENTS = np.linspace(-12.0, 0.0, NUM_THRESHOLDS)


def thresholds() -> np.ndarray:
  return 10.0**THRESHOLD_EXPONENTS


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-np.sum(p * np.log(p)))


def bin_ids(probs: np.ndarray, threshold: float) -> np.ndarray:
  """Integer id of each example's bit pattern `probs > threshold` (equal ids = equal patterns)."""
  bits = np.packbits(np.asarray(probs) > threshold, axis=1)
  if bits.shape[1] <= 8:  # <= 64 classes: the pattern fits one integer
    padded = np.zeros((bits.shape[0], 8), np.uint8)
    padded[:, : bits.shape[1]] = bits
    rows = padded.view(np.uint64)[:, 0]
  else:
    rows = np.ascontiguousarray(bits).view(np.dtype((np.void, bits.shape[1])))[:, 0]
  return np.unique(rows, return_inverse=True)[1].reshape(-1)


def binned_information(probs, labels, thresholds) -> tuple:
  """(cond, rel), each [len(thresholds)] in nats: H(B_t | Y) and H(B_t) - H(B_t | Y) (module doc).

  Args:
    probs: [N, C] predicted likelihoods (softmax or sigmoid outputs).
    labels: [N] integer labels.
    thresholds: binarization thresholds t (a bin is the pattern `probs > t`).
  """
  probs = np.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"probs must be [examples, classes], got shape {probs.shape}")
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != probs.shape[0]:
    raise ValueError(f"{labels.shape[0]} labels for {probs.shape[0]} examples")
  classes, y = np.unique(labels, return_inverse=True)
  h_y = _entropy(np.bincount(y))
  thresholds = np.atleast_1d(np.asarray(thresholds, np.float64))
  cond = np.empty(thresholds.shape)
  rel = np.empty(thresholds.shape)
  for i, t in enumerate(thresholds):
    b = bin_ids(probs, t)
    h_b = _entropy(np.bincount(b))
    h_by = _entropy(np.unique(b.astype(np.int64) * len(classes) + y, return_counts=True)[1])
    cond[i] = h_by - h_y
    rel[i] = h_b - cond[i]
  # Plug-in entropies are exact sums of counts; clip float round-off below zero.
  return np.maximum(cond, 0.0), np.maximum(rel, 0.0)
