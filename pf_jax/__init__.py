"""pf_jax: the SAM family and output-bias forgetting (OBF) for JAX/Flax.

"Forget Sharpness: Perturbed Forgetting of Model Biases Within SAM Dynamics" (ICML 2024).
"""

from pf_jax.losses import get_loss
from pf_jax.losses import labels_of
from pf_jax.losses import sigmoid_cross_entropy
from pf_jax.losses import softmax_cross_entropy
from pf_jax.optimizers import adamw
from pf_jax.optimizers import sgdw
from pf_jax.optimizers import shrink_and_perturb
from pf_jax.optimizers import weight_decay_mask
from pf_jax.perturbations import obf
from pf_jax.perturbations import obf_alpha
from pf_jax.perturbations import obf_fixed_alpha
from pf_jax.sam_family import SamSpec
from pf_jax.sam_family import SamState
from pf_jax.sam_family import perturbed_logits
from pf_jax.sam_family import sam
from pf_jax.sam_family import sam_value_and_grad
from pf_jax.schedules import lr_proportional_rho
from pf_jax.schedules import warmup_linear_decay
from pf_jax.sharding import group_mean
from pf_jax.train_state import TrainState

__all__ = [
  "adamw",
  "get_loss",
  "group_mean",
  "lr_proportional_rho",
  "obf",
  "obf_alpha",
  "obf_fixed_alpha",
  "labels_of",
  "perturbed_logits",
  "sam",
  "sam_value_and_grad",
  "SamSpec",
  "SamState",
  "TrainState",
  "sgdw",
  "shrink_and_perturb",
  "sigmoid_cross_entropy",
  "softmax_cross_entropy",
  "warmup_linear_decay",
  "weight_decay_mask",
]
