"""Every registered model computes timm's function, checked without torch.

`tests/data/models/<name>.npz` holds the logits timm computed (in float64) for seeded weights and
inputs (`benchmarks/model_fixtures.py`, which needs torch and timm, regenerates them). Here the
same weights are drawn with NumPy, loaded through `from_torch`'s mapping, and our model must give
those logits within 1e-5 of their scale, in eval mode (running statistics) and, for BatchNorm
models, in train mode (batch statistics). A changed activation, padding, pooling, normalization
placement or epsilon moves the logits by far more. The ViTs compute in float32 (their errors are
~1e-6); the ResNets in float64 (`dtype`), as their train-mode BatchNorm over a few values per
channel amplifies float32 rounding to ~1e-5 through ResNet-101's 33 blocks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import model_fixtures
from pf_jax import models

# Compile without LLVM's expensive passes: the numbers are the same, compiling twice as fast.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rel_err(ours, theirs) -> float:
  return float(np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max())


# ResNet-101's train mode is the code ResNet-50's checks (same blocks): tens of CPU seconds more
# to compile, so it joins the `long` run; its eval mode (the deeper stage's 23 blocks through
# from_torch) stays in the default suite.
CASES = [
  pytest.param(name, ("eval", "train"), id=name)
  for name in models.model_names()
  if name != "resnet101"
] + [
  pytest.param("resnet101", ("eval",), id="resnet101"),
  pytest.param("resnet101", ("train",), marks=pytest.mark.long, id="resnet101-train"),
]


@pytest.mark.parametrize("name,modes", CASES)
def test_model_computes_timms_function(name, modes):
  f = model_fixtures.load(name)
  sd = model_fixtures.state_dict(f["keys"], int(f["seed"]))
  x = model_fixtures.inputs(name, int(f["seed"]))
  # Same draws as when the fixture was made (else NumPy changed a stream, not the model).
  assert model_fixtures.checksum(sd.values()) == pytest.approx(float(f["weights_sum"]), rel=1e-9)
  assert model_fixtures.checksum([x]) == pytest.approx(float(f["inputs_sum"]), rel=1e-9)
  variables = models.from_torch(name, sd)
  has_bn = models.has_batch_norm(name)
  if not has_bn:
    variables = {"params": variables["params"]}

  with jax.enable_x64(has_bn):
    dtype = jnp.float64 if has_bn else jnp.float32
    model = models.build_model(name, num_classes=model_fixtures.NUM_CLASSES, dtype=dtype)

    @jax.jit
    def logits(variables, x):
      out = {}
      if "eval" in modes:
        out["eval"] = model.apply(variables, x, train=False)
      if "train" in modes and has_bn:
        out["train"] = model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
      return out

    x = x.astype(dtype)
    ours = logits.lower(variables, x).compile(_FAST_COMPILE)(variables, x)
  assert set(ours) == set(modes) & set(f) and "eval" in f and ("train" in f) == has_bn
  assert all(v.dtype == dtype for v in ours.values())
  errors = {mode: _rel_err(ours[mode], f[mode]) for mode in ours}
  assert max(errors.values()) <= 1e-5, errors
