"""Vision Transformer (ViT) in flax.linen: the function of the paper authors' timm model.

The authors train timm's `vit_small_patch{32,16}_224` with `class_token=False, global_pool='avg'`,
so this ViT computes exactly that (`pf_jax.models.from_torch` loads its weights):
  * no class token: patch tokens are averaged ("GAP") and the final LayerNorm is applied to the
    pooled vector (timm's `fc_norm`; its pre-pool `norm` is the identity);
  * exact (erf) GELU, LayerNorm epsilon 1e-6, q/k/v with biases, scale 1/sqrt(head_dim);
  * the authors' (JAX-style) initialization: Xavier-uniform Dense kernels (q, k, v each on
    [width, width]), MLP biases N(0, 1e-6), other biases 0, lecun-normal (truncated) patch
    kernel, position embedding N(0, 1/width), and a classifier head with a zero kernel and a
    constant bias (`head_bias_init`, the scripts' `--head-init-bias`), so at init every logit
    equals that bias.

Parameters are always float32 (`param_dtype`); `dtype` only sets the compute
dtype (e.g. bfloat16), and the logits are returned in float32 regardless.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class PatchEmbedding(nn.Module):
  """Non-overlapping p x p patches -> `width` features: `nn.Conv(width, (p, p), strides=p)`
  computed as patchify + one matmul.

  The parameters are nn.Conv's (`kernel` [p, p, C, width], lecun-normal; `bias` [width], zeros),
  so checkpoints and initial values are unchanged. On XLA:CPU the strided convolution and its
  weight gradient run at half the speed of the equivalent matmul (ViT-S/32, batch 32 at 224^2:
  fwd+bwd 44 ms as a convolution, 22 ms as a matmul; `python -m benchmarks.vit_layers`).
  """

  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p, (b, h, w, c) = self.patch_size, x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    # Like a VALID convolution, drop the rows and columns that do not fill a patch. Then
    # [B, H/p, p, W/p, p, C] -> [B, H/p, W/p, (p, p, C)]: the kernel's own (row, col, channel)
    # order, so a reshape of it is the matching [p*p*C, width] matrix.
    h, w = h // p, w // p
    x = x[:, : h * p, : w * p].reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h, w, p * p * c).astype(self.dtype)
    return x @ kernel.reshape(p * p * c, self.width).astype(self.dtype) + bias.astype(self.dtype)


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dense (big_vision initializers)."""

  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = lambda features, name: nn.Dense(
      features,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6),
      name=name,
    )
    x = dense(self.mlp_dim, "Dense_0")(x)
    x = nn.gelu(x, approximate=False)  # torch.nn.GELU's default
    return dense(width, "Dense_1")(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
    )(y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
    return x + y


class Encoder(nn.Module):
  """Stack of `depth` pre-LN blocks (the final LayerNorm comes after pooling, in `ViT`)."""

  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Encoder1DBlock(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype, name=f"encoderblock_{i}"
      )(x)
    return x


class ViT(nn.Module):
  """ViT classifier: GAP pooling (no class token), then LayerNorm, then the head.

  Input: images [B, H, W, C] with H, W divisible by `patch_size`.
  Output: float32 logits [B, num_classes].
  """

  num_classes: int
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  mlp_dim: int = 1536
  num_heads: int = 6
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    # `train` is accepted for a uniform model signature; with dropout rate 0
    # (as in big_vision's strong-augmentation recipes) ViT is deterministic.
    del train
    x = PatchEmbedding(self.patch_size, self.width, dtype=self.dtype, name="embedding")(x)
    b, h, w, c = x.shape
    x = jnp.reshape(x, (b, h * w, c))

    # Named exactly `pos_embedding`: the weight-decay mask matches this name.
    pos = self.param(
      "pos_embedding", nn.initializers.normal(stddev=c**-0.5), (1, h * w, c), jnp.float32
    )
    x = x + pos.astype(x.dtype)

    x = Encoder(
      depth=self.depth,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dtype=self.dtype,
      name="Transformer",
    )(x)

    # GAP, the final LayerNorm (timm's `fc_norm`) and the head run in float32: they are cheap,
    # and it keeps the logits (and e.g. a -10 bias) exact regardless of the compute dtype.
    x = jnp.mean(x.astype(jnp.float32), axis=1)
    x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, name="fc_norm")(x)
    x = nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.constant(self.head_bias_init),
      name="head",
    )(x)
    return x.astype(jnp.float32)
