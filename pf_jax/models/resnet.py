"""ResNet v1.5 in flax.linen: the function and initialization of timm's `resnet50`/`resnet101`,
which the paper's authors train (`pf_jax.models.from_torch` loads their weights).

v1.5 puts the stride-2 of a downsampling bottleneck on the 3x3 conv (not the
first 1x1), as torchvision and timm do. Padding is PyTorch's: symmetric (k-1)/2 on
every convolution and 1 on the 3x3/2 max-pool (XLA's 'SAME' would pad a stride-2 window
only on the bottom/right, computing a shifted function).

Initialization as timm's: conv kernels He-normal over fan-out (`kaiming_normal_(mode='fan_out')`),
BatchNorm scale 1 and bias 0 except the last BatchNorm of every residual block, whose scale
starts at zero (timm's `zero_init_last`), and a head with PyTorch's default Linear kernel
U(+-1/sqrt(fan_in)). The head bias is the constant `head_bias_init` (the scripts'
`--head-init-bias`; without it PyTorch draws U(+-1/sqrt(2048)) = U(+-0.022)).

BatchNorm statistics live in the `batch_stats` collection: apply with
`train=True, mutable=['batch_stats']` to update them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
ModuleDef = Any


def _torch_conv(features, kernel_size, strides=(1, 1), **kwargs) -> nn.Conv:
  """nn.Conv padded as PyTorch's `Conv2d(padding=(k - 1) // 2)`: symmetric on every side."""
  padding = [((k - 1) // 2, (k - 1) // 2) for k in kernel_size]
  return nn.Conv(features, kernel_size, strides, padding=padding, **kwargs)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 (x4 channels) bottleneck."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1))(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3), self.strides)(y)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class BasicBlock(nn.Module):
  """Two 3x3 convs; used by the small CPU variant where bottlenecks are moot."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNet classifier. Input [B, H, W, C] -> float32 logits [B, num_classes] (float64 when
  `dtype` is float64).

  `stem='imagenet'`: 7x7/2 conv + 3x3/2 max-pool (224px inputs).
  `stem='small'`: a single 3x3/1 conv without pooling (8x8 - 32x32 inputs),
  so tiny images are not downsampled away before the first stage.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block_cls: ModuleDef = BottleneckBlock
  num_filters: int = 64
  stem_filters: int | None = None  # the stem's channels; None: num_filters (timm: always 64)
  stem: str = "imagenet"
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(
      _torch_conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=jnp.float32,
    )

    stem_filters = self.stem_filters or self.num_filters
    if self.stem == "imagenet":
      x = conv(stem_filters, (7, 7), (2, 2), name="conv_init")(x)
      x = norm(name="bn_init")(x)
      x = self.act(x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == "small":
      x = conv(stem_filters, (3, 3), name="conv_init")(x)
      x = norm(name="bn_init")(x)
      x = self.act(x)
    else:
      raise ValueError(f"ResNet: unknown stem={self.stem!r}; allowed: 'imagenet', 'small'")

    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(
          self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
        )(x)

    # Pool and classify in at least float32, so logits are exact under bfloat16 compute (and a
    # float64 model is float64 throughout: benchmarks/equivalence.py).
    head_dtype = jnp.promote_types(self.dtype, jnp.float32)
    x = jnp.mean(x.astype(head_dtype), axis=(1, 2))
    x = nn.Dense(
      self.num_classes,
      dtype=head_dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),  # torch Linear
      bias_init=nn.initializers.constant(self.head_bias_init),
      name="head",
    )(x)
    return x.astype(head_dtype)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
# Small CPU variant: 3x3 stem (16 ch, no max-pool), two stages of one basic
# block each (16, 32 channels). ~20k params; still has BatchNorm throughout.
ResNetTiny = functools.partial(
  ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, num_filters=16, stem="small"
)
