"""PyTorch (timm) weights -> pf_jax variables, for models the paper authors' code trained.

The authors train timm's `vit_small_patch{32,16}_224` (`class_token=False, global_pool='avg'`)
and `resnet50`/`resnet101`; our models of the same names compute the same functions, so their
state dicts map one to one onto our variables (PyTorch kernels are transposed: Linear [out, in]
-> [in, out], Conv2d [out, in, kh, kw] -> [kh, kw, in, out]; timm's fused q/k/v Linear is split
into flax's per-head query/key/value kernels). Torch is optional: only reading a `.pth` file
needs it.

Example:
  >>> import timm, torch  # doctest: +SKIP
  >>> net = timm.create_model("vit_small_patch32_224", class_token=False, global_pool="avg")
  >>> variables = from_torch("vit_s32", net.state_dict())  # {"params": ..., "batch_stats": {}}
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

# timm's ResNet block children, by our block's flax names.
_RESNET_LAYERS = {"conv_proj": "downsample.0", "norm_proj": "downsample.1"}
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_IGNORED = ("num_batches_tracked",)  # PyTorch BatchNorm's step counter: no flax counterpart


def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (any dtype, any device)
    value = value.detach().cpu().float().numpy()
  return np.array(value, np.float32)  # a copy: never a view of the caller's (mutable) tensor


def _natural(key: str) -> list:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _conv(w):  # [out, in, kh, kw] -> [kh, kw, in, out]
  return w.transpose(2, 3, 1, 0)


def _vit_rule(path: tuple[str, ...], shape) -> tuple[str, tuple, Callable]:
  """(torch key, torch shape, torch -> flax conversion) for one ViT leaf."""
  leaf, ident = path[-1], lambda w: w
  if path[0] == "embedding":
    p, _, c, d = shape if leaf == "kernel" else (0, 0, 0, shape[0])
    if leaf == "kernel":
      return "patch_embed.proj.weight", (d, c, p, p), _conv
    return "patch_embed.proj.bias", shape, ident
  if path[0] == "pos_embedding":
    return "pos_embed", shape, ident
  if path[0] in ("fc_norm", "head"):
    name = {"scale": "weight", "kernel": "weight", "bias": "bias"}[leaf]
    if leaf == "kernel":
      return f"{path[0]}.weight", shape[::-1], lambda w: w.T
    return f"{path[0]}.{name}", shape, ident
  block = "blocks." + path[1].removeprefix("encoderblock_")
  module = path[2]
  if module.startswith("LayerNorm_"):
    norm = "norm1" if module == "LayerNorm_0" else "norm2"
    return f"{block}.{norm}.{'weight' if leaf == 'scale' else 'bias'}", shape, ident
  if module.startswith("MlpBlock"):
    fc = "fc1" if path[3] == "Dense_0" else "fc2"
    if leaf == "kernel":
      return f"{block}.mlp.{fc}.weight", shape[::-1], lambda w: w.T
    return f"{block}.mlp.{fc}.bias", shape, ident
  part = path[3]  # query / key / value / out of MultiHeadDotProductAttention_0
  if part == "out":  # kernel [heads, head_dim, width]
    if leaf == "kernel":
      h, hd, d = shape
      return f"{block}.attn.proj.weight", (d, h * hd), lambda w: w.T.reshape(shape)
    return f"{block}.attn.proj.bias", shape, ident
  j = ("query", "key", "value").index(part)
  if leaf == "kernel":  # [width, heads, head_dim] from rows j*width:(j+1)*width of qkv.weight
    d, h, hd = shape
    return (
      f"{block}.attn.qkv.weight",
      (3 * h * hd, d),
      lambda w: w[j * h * hd : (j + 1) * h * hd].T.reshape(shape),
    )
  h, hd = shape
  return (
    f"{block}.attn.qkv.bias",
    (3 * h * hd,),
    lambda w: w[j * h * hd : (j + 1) * h * hd].reshape(shape),
  )


def resnet_rule(stage_sizes):
  starts = np.cumsum((0, *stage_sizes))

  def rule(path: tuple[str, ...], shape) -> tuple[str, tuple, Callable]:
    leaf, ident = path[-1], lambda w: w
    if path[0] == "head":
      if leaf == "kernel":
        return "fc.weight", shape[::-1], lambda w: w.T
      return "fc.bias", shape, ident
    if path[0] in ("conv_init", "bn_init"):
      prefix = "conv1" if path[0] == "conv_init" else "bn1"
    else:  # BottleneckBlock_<n> / BasicBlock_<n>: n counts blocks over all stages
      n = int(path[0].rsplit("_", 1)[1])
      stage = int(np.searchsorted(starts, n, side="right")) - 1
      module = path[1]
      if module in _RESNET_LAYERS:
        child = _RESNET_LAYERS[module]
      else:
        kind, k = module.rsplit("_", 1)
        child = ("conv" if kind == "Conv" else "bn") + str(int(k) + 1)
      prefix = f"layer{stage + 1}.{n - starts[stage]}.{child}"
    if leaf == "kernel":
      kh, kw, ci, co = shape
      return f"{prefix}.weight", (co, ci, kh, kw), _conv
    return f"{prefix}.{_BN[leaf]}", shape, ident

  return rule


# The timm models whose weights ours take, as the authors build them (vision_transformer.py:
# without `class_token=False, global_pool='avg'` timm's ViT has a class token and a final norm).
TIMM_MODELS = {
  "vit_s32": "timm.create_model('vit_small_patch32_224', class_token=False, global_pool='avg')",
  "vit_s16": "timm.create_model('vit_small_patch16_224', class_token=False, global_pool='avg')",
  "resnet50": "timm.create_model('resnet50')",
  "resnet101": "timm.create_model('resnet101')",
}


def timm_constructor(name: str) -> str:
  """The timm call whose `state_dict()` `from_torch(name, ...)` takes, for error messages."""
  from pf_jax import models  # pylint: disable=g-import-not-at-top

  if name in TIMM_MODELS:
    return TIMM_MODELS[name]
  kw = getattr(models.MODELS[name], "keywords", {})
  if models.has_batch_norm(name):
    return "a ResNet of its layout (no timm model: the tiny ResNet has no max-pool)"
  return (
    f"timm's VisionTransformer(patch_size={kw['patch_size']}, embed_dim={kw['width']}, "
    f"depth={kw['depth']}, num_heads={kw['num_heads']}, mlp_ratio={kw['mlp_dim'] / kw['width']:g}, "
    "class_token=False, global_pool='avg')"
  )


def _check_kind(name: str, sd: Mapping[str, Any]) -> None:
  """One line for the commonest mistakes: a ResNet's weights for a ViT (or the reverse), and a
  timm ViT built with its defaults (class token, final norm) instead of the paper's."""
  from pf_jax import models  # pylint: disable=g-import-not-at-top

  resnet = [k for k in ("conv1.weight", "layer1.0.conv1.weight") if k in sd]
  vit = [k for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight") if k in sd]
  want_resnet = models.has_batch_norm(name)
  given, names = ("ViT", vit) if want_resnet else ("ResNet", resnet)
  if names and not (resnet if want_resnet else vit):
    others = [n for n in models.model_names() if models.has_batch_norm(n) != want_resnet]
    raise ValueError(
      f"from_torch({name!r}): the checkpoint is a {given}'s (it has {', '.join(map(repr, names))}) "
      f"and {name} is a {'ResNet' if want_resnet else 'ViT'}: load it as one of "
      f"{', '.join(others)}, or give {name} the state dict of {timm_constructor(name)}"
    )
  if not want_resnet and (
    "cls_token" in sd or ("norm.weight" in sd and "fc_norm.weight" not in sd)
  ):
    has = [k for k in ("cls_token", "norm.weight") if k in sd]
    raise ValueError(
      f"from_torch({name!r}): the checkpoint is of a timm ViT with a class token and a final "
      f"norm (it has {', '.join(map(repr, has))}, no 'fc_norm.weight'); the paper's models are "
      f"built with class_token=False, global_pool='avg': {timm_constructor(name)}"
    )


def _model_and_input(name: str, sd: Mapping[str, np.ndarray]):
  """Our model with the checkpoint's class count, and an input shape with its channel (and a
  ViT's token) count."""
  from pf_jax import models  # pylint: disable=g-import-not-at-top

  kw = getattr(models.MODELS[name], "keywords", {})
  head = "fc.weight" if models.has_batch_norm(name) else "head.weight"
  if head not in sd:
    raise ValueError(f"from_torch({name!r}): the checkpoint has no {head!r} (the classifier)")
  model = models.build_model(name, num_classes=int(sd[head].shape[0]))
  stem = "conv1.weight" if models.has_batch_norm(name) else "patch_embed.proj.weight"
  channels = int(sd[stem].shape[1]) if stem in sd and len(sd[stem].shape) == 4 else 3
  if models.has_batch_norm(name):
    return model, (1, 64, 64, channels), resnet_rule(kw["stage_sizes"])
  tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else 1
  side = math.isqrt(tokens) * kw["patch_size"]
  return model, (1, side, side, channels), _vit_rule


def from_torch(name: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Variables of pf_jax model `name` from a timm/PyTorch `state_dict`.

  Args:
    name: one of `pf_jax.models.model_names()`; the paper models take the weights of timm's
      `vit_small_patch32_224`/`vit_small_patch16_224` (`class_token=False, global_pool='avg'`),
      `resnet50`, `resnet101`. The class count (and a ViT's token count) come from the weights.
    state_dict: key -> torch tensor or NumPy array, e.g. `model.state_dict()`; a DistributedDataParallel
      `module.` prefix is dropped. BatchNorm running statistics become `batch_stats`.

  Returns:
    `{"params": ..., "batch_stats": ...}` (float32 NumPy leaves; `batch_stats` is {} for a ViT).

  Raises:
    ValueError (one line) naming the first missing, unexpected or mis-shaped key.
  """
  from pf_jax import models  # pylint: disable=g-import-not-at-top

  if name not in models.MODELS:
    raise ValueError(
      f"unknown model name={name!r}; allowed names: {', '.join(models.model_names())}"
    )
  sd = {re.sub(r"^module\.", "", k): v for k, v in state_dict.items() if not k.endswith(_IGNORED)}
  _check_kind(name, sd)
  try:
    model, shape, rule = _model_and_input(name, sd)
    return convert(name, model, shape, rule, sd)
  except ValueError as e:  # which timm model fits: the fix for most mismatches
    raise ValueError(f"{e}; {name} takes the state dict of {timm_constructor(name)}") from None


def convert(name: str, model, shape, rule, sd: Mapping[str, Any]) -> dict[str, Any]:
  """`from_torch` for any flax `model` whose leaves `rule` maps (e.g. a resized ResNet):
  `shape` is an input shape for `model.init`, `name` names it in errors."""
  sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items() if not k.endswith(_IGNORED)}
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
  rules = {}  # flax (collection, *path) -> (torch key, torch shape, conversion)
  for collection in ("params", "batch_stats"):
    for path, leaf in flax.traverse_util.flatten_dict(shapes.get(collection, {})).items():
      rules[(collection, *path)] = rule(path, tuple(leaf.shape))
  used = {}  # torch key -> its shape, checked in the model's order (blocks.2 before blocks.10)
  for key, want, _ in sorted(rules.values(), key=lambda r: _natural(r[0])):
    if key not in sd:
      raise ValueError(f"from_torch({name!r}): the checkpoint has no {key!r} (shape {want})")
    if tuple(sd[key].shape) != want:
      raise ValueError(
        f"from_torch({name!r}): {key!r} has shape {tuple(sd[key].shape)}, {name} needs {want}"
      )
    used[key] = want
  extra = [k for k in sd if k not in used]
  if extra:
    raise ValueError(
      f"from_torch({name!r}): unexpected key {extra[0]!r} (shape {tuple(sd[extra[0]].shape)}) "
      f"is not part of {name}"
    )
  out = {"params": {}, "batch_stats": {}}
  for (collection, *path), (key, _, convert) in rules.items():
    out[collection][tuple(path)] = convert(_numpy(sd[key]))
  out = {k: flax.traverse_util.unflatten_dict(v) if v else {} for k, v in out.items()}
  return out


def read_checkpoint(path: str) -> dict[str, Any]:
  """The model state dict of a PyTorch checkpoint file (`.pth`/`.pth.tar`).

  Accepts what the authors' `train.py` saves (a dict whose `state_dict` holds the weights, next
  to `optimizer` and `args`), a dict with `model`, or a bare state dict. Reading needs torch.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
      f"{path} is a PyTorch checkpoint and reading it needs torch (pip install torch)"
    ) from None
  try:
    # weights_only: no code runs from the file; train.py also pickles its argparse Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
      ckpt = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{path} is not a readable PyTorch checkpoint ({first})") from None
  if isinstance(ckpt, dict):
    for key in ("state_dict", "model"):
      if isinstance(ckpt.get(key), Mapping):
        return dict(ckpt[key])
    if all(hasattr(v, "shape") for v in ckpt.values()):
      return ckpt
  raise ValueError(f"{path} holds no model state dict ('state_dict', 'model' or bare tensors)")


def is_torch_checkpoint(path: str) -> bool:
  """True for a PyTorch checkpoint file name (`.pth`, `.pth.tar`, `.pt`)."""
  return str(path).endswith((".pth", ".pth.tar", ".pt"))
