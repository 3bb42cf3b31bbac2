"""pf_jax against the paper authors' PyTorch stack (timm models, their train.py's step).

  python -m benchmarks.equivalence            # prints the table, writes results/equivalence.md

Needs torch and timm (`pip install -e .[bench]`). Two measurements:

* logits: each paper model and timm's model of the same name, from the same weights
  (`pf_jax.models.from_torch`), in eval mode (BatchNorm running statistics) and train mode (batch
  statistics); the relative error is max|jax - torch| / max|torch| over the logits;
* training: see `benchmarks/equivalence_step.py`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import timm
import torch

from pf_jax import models

# Our model name -> (timm model name, keyword arguments as the authors' scripts pass them).
TIMM = {
  "vit_s32": ("vit_small_patch32_224", {"class_token": False, "global_pool": "avg"}),
  "vit_s16": ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
  "resnet50": ("resnet50", {}),
  "resnet101": ("resnet101", {}),
}
# Small models for the training-step checks: the same classes (timm's VisionTransformer /
# ResNet) at CPU sizes.
_SMALL_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}


def timm_model(name: str, num_classes: int, image_size: int, in_chans: int = 3) -> torch.nn.Module:
  """timm's model computing pf_jax model `name` (float32, CPU)."""
  torch.manual_seed(0)
  if name in TIMM:
    timm_name, kw = TIMM[name]
    if timm_name.startswith("vit"):
      kw = dict(kw, img_size=image_size)
    return timm.create_model(timm_name, num_classes=num_classes, in_chans=in_chans, **kw)
  if name == "vit_digits":
    from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top

    return VisionTransformer(
      img_size=image_size,
      patch_size=2,
      in_chans=in_chans,
      num_classes=num_classes,
      class_token=False,
      global_pool="avg",
      **_SMALL_VIT,
    )
  raise ValueError(f"no timm counterpart for {name!r}")


@torch.no_grad()
def randomize(net: torch.nn.Module, seed: int = 0) -> None:
  """Give every parameter and BatchNorm statistic a non-trivial value (zero-initialized heads,
  LayerNorm/BatchNorm affines, running statistics), so every one of them is exercised."""
  g = torch.Generator().manual_seed(seed)
  for name, t in net.state_dict().items():
    if not t.is_floating_point():
      continue
    r = torch.randn(t.shape, generator=g)
    if name.endswith("running_var"):
      t.copy_(0.5 + torch.rand(t.shape, generator=g))
    elif t.ndim == 1 and (name.endswith("weight")):  # norm scales around 1
      t.copy_(1 + 0.1 * r)
    elif t.ndim == 1:  # biases, norm shifts, running means
      t.copy_(0.1 * r)
    elif name.startswith(("head", "fc.")):
      t.copy_(r / np.sqrt(t.shape[-1]))


def rel_err(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def logits_errors(name: str, image_size: int, batch: int = 2, num_classes: int = 10, seed: int = 0):
  """{"eval": rel. error, "train": rel. error} of pf_jax model `name` against timm's."""
  net = timm_model(name, num_classes, image_size)
  randomize(net, seed)
  variables = models.from_torch(name, net.state_dict())
  model = models.build_model(name, num_classes=num_classes)
  x = np.random.default_rng(seed).normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  has_bn = models.has_batch_norm(name)
  out = {}
  for mode in ("eval", "train"):
    net.train(mode == "train")
    with torch.no_grad():
      theirs = net(xt).numpy()
    variables_now = variables if has_bn else {"params": variables["params"]}
    if has_bn and mode == "train":
      apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
      ours = jax.jit(lambda v, x, f=apply: f(v, x)[0])(variables_now, x)
    else:
      ours = jax.jit(functools.partial(model.apply, train=mode == "train"))(variables_now, x)
    out[mode] = rel_err(ours, theirs)
  return out
