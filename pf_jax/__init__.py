"""pf_jax: the SAM family and output-bias forgetting (OBF) for JAX/Flax.

"Forget Sharpness: Perturbed Forgetting of Model Biases Within SAM Dynamics" (ICML 2024).

The public names are imported on first use (PEP 562), so `import pf_jax.process` does not import
JAX: main.py catches signals before JAX's and TensorFlow's imports (seconds) begin.
"""

import importlib

# Each public name (`__all__`, in this order) and the submodule that defines it.
_SOURCES = {
  "adamw": "optimizers",
  "get_loss": "losses",
  "group_mean": "sharding",
  "lr_proportional_rho": "schedules",
  "obf": "perturbations",
  "obf_alpha": "perturbations",
  "obf_fixed_alpha": "perturbations",
  "labels_of": "losses",
  "perturbed_logits": "sam_family",
  "sam": "sam_family",
  "sam_value_and_grad": "sam_family",
  "SamSpec": "sam_family",
  "SamState": "sam_family",
  "TrainState": "train_state",
  "sgdw": "optimizers",
  "shrink_and_perturb": "optimizers",
  "sigmoid_cross_entropy": "losses",
  "softmax_cross_entropy": "losses",
  "warmup_linear_decay": "schedules",
  "weight_decay_mask": "optimizers",
}
__all__ = list(_SOURCES)


def __getattr__(name: str):
  if name not in _SOURCES:
    raise AttributeError(f"module 'pf_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"pf_jax.{_SOURCES[name]}"), name)
  globals()[name] = value  # later look-ups do not come back here
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
