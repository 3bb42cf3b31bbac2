"""Measuring what the paper is about: sharpness and perturbed forgetting (Section 6.1, Figure 2).

- `hessian_top_eigenvalue`: sharpness, the dominant Hessian eigenvalue (power iteration).
- `binned_information`: I(X; Y^|Y) and I(Y^; Y) of thresholded likelihoods.
- `adjusted_exponents`, `point_measures`, `run_measures`: adjusted thresholds and forgetting.
- `kendall_tau`, `permutation_pvalue`: rank correlation with accuracy across a pool of runs.

The training-system parts (collection during training, checkpoint sharpness, Figure 2 and the
results tables) are in `collect`, `sharpness`, `figure2`, `report`, and the command line
`python -m pf_jax.analysis {sharpness,forgetting,report}`.
"""

from pf_jax.analysis.correlation import kendall_tau
from pf_jax.analysis.correlation import permutation_pvalue
from pf_jax.analysis.forgetting import ADJUSTED_THRESHOLDS
from pf_jax.analysis.forgetting import adjusted_exponents
from pf_jax.analysis.forgetting import point_measures
from pf_jax.analysis.forgetting import run_measures
from pf_jax.analysis.hessian import hessian_top_eigenvalue
from pf_jax.analysis.information import THRESHOLD_EXPONENTS
from pf_jax.analysis.information import binned_information
from pf_jax.analysis.information import thresholds

__all__ = [
  "ADJUSTED_THRESHOLDS",
  "THRESHOLD_EXPONENTS",
  "adjusted_exponents",
  "binned_information",
  "hessian_top_eigenvalue",
  "kendall_tau",
  "permutation_pvalue",
  "point_measures",
  "run_measures",
  "thresholds",
]
