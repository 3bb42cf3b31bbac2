"""Tests for pf_jax.models: shapes, dtypes, head init, BatchNorm state, counts.

Full-size models are only shape-traced with `jax.eval_shape` (no real init),
so the whole file runs in seconds on a 2-core CPU.
"""

import functools
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pf_jax.models import MODELS
from pf_jax.models import build_model
from pf_jax.models import from_torch
from pf_jax.models import has_batch_norm
from pf_jax.models import model_names
from pf_jax.models import torch_weights
from pf_jax.models.vit import PatchEmbedding

SMALL = {
  # name: input shape (NHWC) it is meant for
  "vit_ti4": (2, 32, 32, 3),
  "vit_digits": (2, 8, 8, 1),
  "resnet_tiny": (2, 8, 8, 1),
}
ALL_NAMES = ("vit_s32", "vit_s16", "vit_ti4", "vit_digits", "resnet50", "resnet101", "resnet_tiny")
NUM_CLASSES = 10
# These tests check shapes/values, not speed: skip LLVM's expensive passes,
# which roughly halves XLA:CPU compile time (the bulk of this file's runtime).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _build_and_run(name, shape, **kw):
  """Init + eval apply (+ train apply with BN) in ONE jitted function: each XLA
  compile costs seconds on a 2-core CPU, so compile once per model."""
  model = build_model(name, num_classes=NUM_CLASSES, **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)

  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def run(rng, x):
    variables = model.init(rng, x, train=False)
    out = {"variables": variables, "eval_logits": model.apply(variables, x, train=False)}
    if has_batch_norm(name):
      out["train_logits"], out["train_state"] = model.apply(
        variables, x, train=True, mutable=["batch_stats"]
      )
      _, out["eval_state"] = model.apply(variables, x, train=False, mutable=["batch_stats"])
    else:
      out["train_logits"] = model.apply(variables, x, train=True)
    return out

  return model, x, run(jax.random.PRNGKey(0), x)


@pytest.fixture(scope="module")
def small_runs():
  """Each small variant once in fp32 with head bias -10, shared by tests."""
  return {n: _build_and_run(n, s, head_bias_init=-10.0) for n, s in SMALL.items()}


def test_registry_names_exact():
  assert set(MODELS) == set(ALL_NAMES)
  assert set(model_names()) == set(ALL_NAMES)


def test_unknown_name_raises_value_error():
  with pytest.raises(ValueError) as e:
    build_model("vit_b16", num_classes=10)
  msg = str(e.value)
  assert "name" in msg and "vit_b16" in msg
  for n in ALL_NAMES:
    assert n in msg
  with pytest.raises(ValueError):
    has_batch_norm("nope")


def test_has_batch_norm():
  for n in ALL_NAMES:
    assert has_batch_norm(n) == n.startswith("resnet"), n


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_logits_shape_dtype_and_head_bias(name, small_runs):
  _, x, out = small_runs[name]
  params = out["variables"]["params"]
  bias = params["head"]["bias"]
  assert bias.shape == (NUM_CLASSES,)
  np.testing.assert_array_equal(np.asarray(bias), -10.0)
  kernel = np.asarray(params["head"]["kernel"])
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32
  for key in ("eval_logits", "train_logits"):
    logits = out[key]
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert logits.dtype == jnp.float32
  if has_batch_norm(name):
    # timm's ResNet head is PyTorch's default Linear: kernel U(+-1/sqrt(fan_in)).
    bound = 1 / np.sqrt(kernel.shape[0])
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.5 * bound
  else:
    # The authors' ViT head: zero kernel => every initial logit is exactly the head bias.
    np.testing.assert_array_equal(kernel, 0.0)
    np.testing.assert_array_equal(np.asarray(out["eval_logits"]), -10.0)
    np.testing.assert_array_equal(np.asarray(out["train_logits"]), -10.0)


def test_vit_digits_params_closed_form(small_runs):
  _, _, out = small_runs["vit_digits"]
  variables = out["variables"]
  params = variables["params"]
  assert set(variables) == {"params"}  # no batch_stats for ViT
  # Hand count: 8x8x1 images, patch 2, width 64, depth 2, mlp 128, 10 classes.
  p, c, d, depth, mlp, k = 2, 1, 64, 2, 128, NUM_CLASSES
  tokens = (8 // p) * (8 // p)  # 16; no class token
  embed = p * p * c * d + d
  pos = tokens * d
  ln = 2 * d
  attn = 3 * (d * d + d) + (d * d + d)  # q, k, v, out projections
  mlp_params = (d * mlp + mlp) + (mlp * d + d)
  block = ln + attn + ln + mlp_params
  head = d * k + k
  expected = embed + pos + depth * block + ln + head
  assert expected == 69066
  assert _count(params) == expected
  assert params["pos_embedding"].shape == (1, tokens, d)
  assert not any(
    "cls" in "/".join(path).lower() for path in flax.traverse_util.flatten_dict(params)
  )


def test_vit_pos_embedding_init_std(small_runs):
  _, _, out = small_runs["vit_ti4"]
  pos = np.asarray(out["variables"]["params"]["pos_embedding"])
  assert pos.shape == (1, 64, 128)  # 32x32 / patch 4 = 64 tokens, no cls
  # The authors' init: normal(stddev=1/sqrt(width)); 8192 draws pin the std to ~1%.
  np.testing.assert_allclose(pos.std(), 1 / np.sqrt(128), rtol=0.05)


def test_resnet_init_is_timms():
  """timm's ResNet init: conv kernels N(0, 2/fan_out) (kaiming_normal_, mode='fan_out'), the
  last BatchNorm scale of every block zero, the others one."""
  model = build_model("resnet50", num_classes=1000)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.jit(
    lambda: model.init(jax.random.PRNGKey(0), x), compiler_options=_FAST_COMPILE
  )()
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  w = np.asarray(flat["BottleneckBlock_15/Conv_1/kernel"])  # 3x3, 512 -> 512: fan_out 4608
  assert w.shape == (3, 3, 512, 512)
  np.testing.assert_allclose(w.std(), np.sqrt(2 / (9 * 512)), rtol=0.01)
  assert np.abs(w).max() > 4 * w.std()  # untruncated normal (torch's kaiming_normal_)
  for path, leaf in flat.items():
    if path.endswith("scale"):
      want = 0.0 if path.endswith("BatchNorm_2/scale") else 1.0
      np.testing.assert_array_equal(np.asarray(leaf), want, err_msg=path)


def test_resnet_tiny_batch_stats_train_vs_eval(small_runs):
  _, _, out = small_runs["resnet_tiny"]
  variables = out["variables"]
  assert "batch_stats" in variables
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert any("BatchNorm" in k for k in flat)
  # Zero-init residual: the last BN scale of each of the 2 blocks is zero.
  zero_scales = [k for k, v in flat.items() if k.endswith("scale") and not np.any(np.asarray(v))]
  assert len(zero_scales) == 2, zero_scales
  old = variables["batch_stats"]

  # Train mode updates running stats...
  diffs = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), old, out["train_state"]["batch_stats"]
  )
  assert max(jax.tree.leaves(diffs)) > 1e-4
  # ...eval mode leaves them untouched.
  assert jax.tree.structure(old) == jax.tree.structure(out["eval_state"]["batch_stats"])
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(out["eval_state"]["batch_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bfloat16_compute_gives_float32_logits(name):
  # Default head_bias_init (0.0) here, so this also covers the default.
  model, x, out = _build_and_run(name, SMALL[name], dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  for leaf in jax.tree.leaves(out["variables"]):
    assert leaf.dtype == jnp.float32  # params and batch_stats stay fp32
  np.testing.assert_array_equal(np.asarray(out["variables"]["params"]["head"]["bias"]), 0.0)
  for key in ("eval_logits", "train_logits"):
    assert out[key].dtype == jnp.float32
    assert out[key].shape == (x.shape[0], NUM_CLASSES)
    if not has_batch_norm(name):  # zero head kernel: logits are the bias (ResNet's is random)
      np.testing.assert_array_equal(np.asarray(out[key]), 0.0)


# vit_ti4 is left out: same code path as vit_digits, and its compile is slow.
@pytest.mark.parametrize("name", ["vit_digits", "resnet_tiny"])
def test_small_models_learn(name, small_runs):
  """A few Adam steps on one fixed batch must cut the loss (grads flow
  through the zero-init head and the rest of the network)."""
  model, _, out = small_runs[name]
  variables = out["variables"]
  shape = (16,) + SMALL[name][1:]
  x = jax.random.normal(jax.random.PRNGKey(2), shape)
  y = jax.random.randint(jax.random.PRNGKey(3), (16,), 0, NUM_CLASSES)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  bn = has_batch_norm(name)

  def loss_fn(params, extra):
    v = {"params": params, **extra}
    if bn:
      logits, new = model.apply(v, x, train=True, mutable=["batch_stats"])
    else:
      logits, new = model.apply(v, x, train=True), extra
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new

  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def step(params, extra, opt):
    (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(params, extra)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), new, opt, loss

  losses = []
  for _ in range(15):
    params, extra, opt, loss = step(params, extra, opt)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  # Without gradient flow the loss would stay at exactly log(10).
  assert losses[-1] < 0.85 * losses[0], losses


def _vit_s_count(patch, tokens, classes=1000, width=384, depth=12, mlp=1536):
  """ViT-S by hand: patch embedding, position embedding, blocks (2 LayerNorms, qkv, projection,
  2 MLP layers), the final LayerNorm and the head."""
  block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width)
  block += (width * mlp + mlp) + (mlp * width + width)
  embed = patch * patch * 3 * width + width + tokens * width
  return embed + depth * block + 2 * width + width * classes + classes


@pytest.mark.parametrize(
  "name,expected",
  [
    # sum(p.numel() for p in timm.create_model(...).parameters()), timm 1.0, 1000 classes;
    # the ViTs with class_token=False, global_pool='avg' as the authors build them.
    ("vit_s16", 22_049_896),
    ("vit_s32", 22_878_184),
    ("resnet50", 25_557_032),
    ("resnet101", 44_549_160),
  ],
)
def test_full_size_param_counts(name, expected):
  model = build_model(name, num_classes=1000, head_bias_init=-10.0)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  n = _count(shapes["params"])
  assert n == expected  # exact: one missing LayerNorm or bias is 384 or 1000 parameters
  if name.startswith("vit"):
    patch = int(name[-2:])
    assert expected == _vit_s_count(patch, (224 // patch) ** 2)
  # Headline numbers from the papers, also within 1%.
  headline = {"vit_s16": 22.0e6, "vit_s32": 22.9e6, "resnet50": 25.6e6, "resnet101": 44.5e6}[name]
  assert abs(n - headline) <= 0.01 * headline, n
  assert ("batch_stats" in shapes) == has_batch_norm(name)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), shapes, x)
  assert out.shape == (1, 1000) and out.dtype == jnp.float32


@pytest.mark.parametrize(
  "patch,shape", [(2, (3, 8, 8, 1)), (4, (2, 16, 12, 3)), (4, (2, 18, 15, 2))]
)
def test_patch_embedding_equals_strided_conv(patch, shape):
  """The ViT's patchify + matmul is flax's strided nn.Conv: the same parameters from the same
  key, and the same outputs and kernel gradients up to float rounding (also where the image
  sides are not multiples of the patch: VALID padding drops the rest)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  conv = nn.Conv(5, (patch, patch), strides=(patch, patch), padding="VALID")
  ours = PatchEmbedding(patch, 5)
  key = jax.random.PRNGKey(3)
  p_conv, p_ours = conv.init(key, x)["params"], ours.init(key, x)["params"]
  assert jax.tree.map(np.shape, p_conv) == jax.tree.map(np.shape, p_ours)
  np.testing.assert_array_equal(p_conv["kernel"], p_ours["kernel"])
  # A bias that is not zero, so the test sees it added once per patch.
  p = {"kernel": p_conv["kernel"], "bias": jnp.arange(5.0)}
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=conv.apply({"params": p}, x).shape))
  for module in (conv, ours):
    out, vjp = jax.vjp(lambda q, m=module: m.apply({"params": q}, x), p)
    if module is conv:
      want_out, want_grad = out, vjp(cotangent)[0]
    else:
      np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
        vjp(cotangent)[0],
        want_grad,
      )


def test_from_torch_errors_without_torch(monkeypatch):
  """from_torch takes NumPy arrays, so its checks run without torch; reading a .pth needs it."""
  with pytest.raises(ValueError, match="unknown model name='vit_b16'"):
    from_torch("vit_b16", {})
  with pytest.raises(
    ValueError, match=r"from_torch\('vit_digits'\): the checkpoint has no 'head.weight'"
  ):
    from_torch("vit_digits", {"pos_embed": np.zeros((1, 16, 64))})
  sd = {"head.weight": np.zeros((10, 64)), "patch_embed.proj.weight": np.zeros((64, 3, 2, 2))}
  with pytest.raises(
    ValueError, match=r"the checkpoint has no 'blocks.0.attn.proj.bias' \(shape \(64,\)\)"
  ):
    from_torch("vit_digits", sd)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if not installed
  with pytest.raises(ValueError, match=r"x.pth is a PyTorch checkpoint and reading it needs torch"):
    torch_weights.read_checkpoint("x.pth")


def test_from_torch_names_the_timm_constructor_and_the_wrong_kind():
  """Issue 30: a default timm ViT said only "no 'fc_norm.bias'", a ResNet's state dict for a ViT
  only "no 'head.weight'". Each is now one line naming the timm call the paper's models need."""
  z = np.zeros
  resnet_sd = {"conv1.weight": z((64, 3, 7, 7)), "layer1.0.conv1.weight": z((64, 64, 1, 1))}
  vit_sd = {
    "patch_embed.proj.weight": z((384, 3, 32, 32)),
    "blocks.0.attn.qkv.weight": z((1152, 384)),
  }
  # timm.create_model('vit_small_patch32_224') with its defaults: class token, final norm.
  default_vit = dict(vit_sd, cls_token=z((1, 1, 384)), **{"norm.weight": z(384)})
  vit_s32 = "timm.create_model('vit_small_patch32_224', class_token=False, global_pool='avg')"
  cases = [
    ("vit_s32", dict(resnet_sd, **{"fc.weight": z((10, 2048))}), ["a ResNet's", "vit_s32 is a ViT", "resnet50", vit_s32]),
    ("resnet50", dict(vit_sd, **{"head.weight": z((10, 384))}), ["a ViT's", "resnet50 is a ResNet", "vit_s32", "timm.create_model('resnet50')"]),
    ("vit_s32", dict(default_vit, **{"head.weight": z((10, 384))}), ["'cls_token', 'norm.weight', no 'fc_norm.weight'", vit_s32]),
    ("vit_s16", {"pos_embed": z((1, 196, 384))}, ["no 'head.weight'", "vit_small_patch16_224', class_token=False, global_pool='avg'"]),
    ("vit_digits", {"pos_embed": z((1, 16, 64))}, ["VisionTransformer(patch_size=2, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, class_token=False, global_pool='avg')"]),
  ]  # fmt: skip
  for name, sd, parts in cases:
    with pytest.raises(ValueError) as e:
      from_torch(name, sd)
    message = str(e.value)
    assert message.startswith(f"from_torch({name!r}): ") and "\n" not in message, message
    for part in parts:
      assert part in message, (part, message)
