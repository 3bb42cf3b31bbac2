"""Model zoo: a name -> constructor registry so configs can pick models by name.

All models share `__call__(x, train: bool = False) -> float32 logits [B, C]`,
take NHWC images, keep float32 params, and have a head named `head` whose bias
starts at `head_bias_init`. The paper names (`vit_s32`, `vit_s16`, `resnet50`,
`resnet101`) compute the functions of the timm models the authors train and load
their weights with `from_torch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pf_jax.models.resnet import BasicBlock
from pf_jax.models.resnet import BottleneckBlock
from pf_jax.models.resnet import ResNet
from pf_jax.models.resnet import ResNet50
from pf_jax.models.resnet import ResNet101
from pf_jax.models.resnet import ResNetTiny
from pf_jax.models.torch_weights import from_torch
from pf_jax.models.vit import ViT

__all__ = [
  "MODELS",
  "build_model",
  "from_torch",
  "has_batch_norm",
  "input_multiple",
  "model_names",
  "ViT",
  "ResNet",
  "ResNet50",
  "ResNet101",
  "ResNetTiny",
  "BasicBlock",
  "BottleneckBlock",
]

# Each entry builds a module given (num_classes, head_bias_init, dtype).
MODELS: dict[str, Callable[..., nn.Module]] = {
  # Paper sizes (ViT-S: width 384, depth 12, mlp 1536, 6 heads).
  "vit_s32": functools.partial(ViT, patch_size=32, width=384, depth=12, mlp_dim=1536, num_heads=6),
  "vit_s16": functools.partial(ViT, patch_size=16, width=384, depth=12, mlp_dim=1536, num_heads=6),
  # CPU-sized: 32x32 inputs -> 8x8=64 tokens, ~0.55M params.
  "vit_ti4": functools.partial(ViT, patch_size=4, width=128, depth=4, mlp_dim=256, num_heads=4),
  # CPU-sized: 8x8 inputs (sklearn digits) -> 4x4=16 tokens, ~69k params.
  "vit_digits": functools.partial(ViT, patch_size=2, width=64, depth=2, mlp_dim=128, num_heads=4),
  "resnet50": ResNet50,
  "resnet101": ResNet101,
  "resnet_tiny": ResNetTiny,
}

_BATCH_NORM = frozenset({"resnet50", "resnet101", "resnet_tiny"})


def model_names() -> tuple[str, ...]:
  """Registered model names, sorted (for error messages / CLI help)."""
  return tuple(sorted(MODELS))


def _check_name(name: str) -> None:
  if name not in MODELS:
    raise ValueError(f"unknown model name={name!r}; allowed names: {', '.join(model_names())}")


def build_model(
  name: str, *, num_classes: int, head_bias_init: float = 0.0, dtype: Any = jnp.float32
) -> nn.Module:
  """Build registered model `name` (see `model_names()`).

  Raises ValueError for an unknown `name`, listing the allowed names.
  """
  _check_name(name)
  return MODELS[name](num_classes=num_classes, head_bias_init=float(head_bias_init), dtype=dtype)


def input_multiple(name: str) -> int:
  """Image sides must be a multiple of this (a ViT's patch size; 1 for ResNets)."""
  _check_name(name)
  return getattr(MODELS[name], "keywords", {}).get("patch_size", 1)


def has_batch_norm(name: str) -> bool:
  """True if the model keeps a `batch_stats` collection (train code must then
  apply with `mutable=['batch_stats']` and carry the stats)."""
  _check_name(name)
  return name in _BATCH_NORM
