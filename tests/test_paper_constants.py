"""The values the paper (and, where it is silent, the authors' code) defines, as they write them.

Each test states a defined constant the way its source does (Section 6.1, Appendix C, the authors'
timm models and train.py; docs/fidelity.md says which governs) and checks that the code computes
with it, so moving one fails here even where the tests of the mechanism take the constant from
the code. The Table C.1 run settings are pinned by tests/test_configs.py (Section 6.1's pool) and
tests/test_authors_runs.py (the authors' scripts).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_msweep
from pf_jax import models
from pf_jax import preprocessing
from pf_jax.analysis import figure2
from pf_jax.analysis import forgetting
from pf_jax.analysis import information

# Compile without LLVM's expensive passes: the same numbers, compiled in a fraction of the time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_thresholds_are_ten_to_100_exponents_from_minus_12_to_0():
  # Section 6.1: "thresholds t = 10^r at 100 values of r linearly spaced between -12 to 0".
  want = 10.0 ** np.linspace(-12.0, 0.0, 100)
  np.testing.assert_allclose(information.thresholds(), want, rtol=1e-12)


def test_ten_outputs_have_two_to_the_ten_bins():
  """Section 6.1: "With 10 output dimensions for the 10 classes, the maximum possible number of
  bins is 2^10". 1024 examples of one class showing every pattern of 10 bits at the threshold
  fall into 1024 bins: H(B | Y) = ln 1024; twice as many examples, 1024 bins still."""
  patterns = (np.arange(1024)[:, None] >> np.arange(10)) & 1  # every 10-bit pattern once
  probs = np.where(patterns, 0.09, 0.01)  # above / below t = 0.05
  labels = np.zeros(1024, int)
  cond, rel = information.binned_information(probs, labels, [0.05])
  np.testing.assert_allclose(cond, [10 * np.log(2)], rtol=1e-12)
  np.testing.assert_allclose(rel, [0.0], atol=1e-12)  # one class: no task information
  twice = information.binned_information(np.tile(probs, (2, 1)), np.zeros(2048, int), [0.05])
  np.testing.assert_allclose(twice[0], [10 * np.log(2)], rtol=1e-12)


def test_adjusted_thresholds_run_from_0_to_1():
  # Section 6.1: the unperturbed information "decreases linearly from 1 to 0 between
  # thresholds 0 to 1" after adjustment: the adjusted thresholds span [0, 1], evenly.
  a = forgetting.ADJUSTED_THRESHOLDS
  assert a[0] == 0.0 and a[-1] == 1.0
  np.testing.assert_allclose(np.diff(a), np.diff(a)[0], rtol=1e-9)


def test_significance_level_is_0_05():
  # Figure 2: "we show solid lines only when the p-value <= 0.05".
  assert figure2.SIGNIFICANT == 0.05


def test_pool_collects_softmax_outputs_on_the_cifar10_test_split():
  # Section 6.1: "we collect the softmax model outputs on the CIFAR-10 validation set".
  for arg in ("steep,1", "obf,64", "obf_gamma0,512"):
    c = cifar10_msweep.get_config(arg)
    assert c.analysis.predictions == "softmax"
    assert (c.analysis.dataset or c.eval_datasets[0]) == "cifar10"


def _norms(name, shape):
  """(kind, epsilon, momentum) of every normalization layer model `name` applies."""
  seen = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, (nn.LayerNorm, nn.BatchNorm)) and context.method_name == "__call__":
      seen.append((type(m).__name__, m.epsilon, getattr(m, "momentum", None)))
    return next_fun(*args, **kwargs)

  model = models.build_model(name, num_classes=10)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return seen


@pytest.mark.parametrize("name", ["vit_s32", "vit_s16", "vit_ti4", "vit_digits"])
def test_vit_layer_norms_have_timms_epsilon_1e_6(name):
  # timm's VisionTransformer: norm_layer = partial(nn.LayerNorm, eps=1e-6), every norm and fc_norm.
  side = {"vit_s32": 64, "vit_s16": 32, "vit_ti4": 32, "vit_digits": 8}[name]
  seen = _norms(name, (1, side, side, 3))
  depth = models.MODELS[name].keywords["depth"]
  assert len(seen) == 2 * depth + 1  # two per block, and fc_norm after pooling
  assert all(kind == "LayerNorm" and eps == 1e-6 for kind, eps, _ in seen), seen


@pytest.mark.parametrize("name,count", [("resnet50", 53), ("resnet101", 104), ("resnet_tiny", 6)])
def test_resnet_batch_norms_have_torchs_epsilon_and_momentum(name, count):
  # torch.nn.BatchNorm2d (timm's ResNet): eps 1e-5, momentum 0.1, i.e. flax's momentum 0.9
  # (the weight of the old running value).
  seen = _norms(name, (1, 32, 32, 3))
  assert len(seen) == count
  assert all(s == ("BatchNorm", 1e-5, 0.9) for s in seen), set(seen)


def test_vit_initialization_is_the_authors():
  """The authors' timm ViT (JAX-style init): Xavier-uniform q/k/v/out/MLP kernels, MLP biases
  N(0, 1e-6), the other biases 0, a truncated lecun-normal patch kernel (std 1/sqrt(fan_in)), a
  zero head kernel with bias HEAD BIAS INIT (Table C.1: -10)."""
  model = models.build_model("vit_ti4", num_classes=10, head_bias_init=-10.0)
  args = (jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  p = jax.jit(model.init).lower(*args).compile(_FAST_COMPILE)(*args)["params"]
  block = p["Transformer"]["encoderblock_1"]
  attn, mlp = block["MultiHeadDotProductAttention_0"], block["MlpBlock_0"]
  for kernel, fan_in, fan_out in [
    (attn["query"]["kernel"].reshape(128, 128), 128, 128),
    (attn["out"]["kernel"].reshape(128, 128), 128, 128),
    (mlp["Dense_0"]["kernel"], 128, 256),
  ]:
    bound = np.sqrt(6 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    np.testing.assert_allclose(np.std(kernel), bound / np.sqrt(3), rtol=0.03)
  np.testing.assert_allclose(np.std(mlp["Dense_0"]["bias"]), 1e-6, rtol=0.3)
  assert np.all(attn["query"]["bias"] == 0) and np.all(attn["out"]["bias"] == 0)
  patch = p["embedding"]["kernel"]  # [4, 4, 3, 128]: fan_in 48
  np.testing.assert_allclose(np.std(patch), 1 / np.sqrt(48), rtol=0.05)
  assert np.abs(patch).max() <= 2 / np.sqrt(48) / 0.8796  # truncated at 2 (unscaled) stds
  assert np.all(p["head"]["kernel"] == 0) and np.all(p["head"]["bias"] == -10.0)


def test_inception_crop_area_and_aspect_ratio():
  """The authors' train.py: RandomResizedCrop scale (0.05, 1.0) (`--scale` default), ratio
  (3/4, 4/3). 400 crops of a 1000x1000 image: every one inside those ranges, and the ranges'
  ends reached (to rounding)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  hw = np.array(
    [
      [int(v) for v in preprocessing._sample_crop(tf.constant([1000, 1000, 3]), [i, 7], 0.05)[2:]]
      for i in range(400)
    ]
  )
  area, ratio = hw[:, 0] * hw[:, 1] / 1e6, hw[:, 1] / hw[:, 0]
  assert area.min() >= 0.049 and area.min() < 0.1 and area.max() > 0.9
  assert ratio.min() >= 0.749 and ratio.max() <= 1.335
  assert ratio.min() < 0.77 and ratio.max() > 1.3
