"""Reference fixtures of every registered model's function, made once with timm, checked without it.

  python -m benchmarks.model_fixtures [NAME ...]   # needs torch, timm; rewrites tests/data/models/

CI has no torch, so `tests/test_model_fixtures.py` checks each model against numbers timm computed
when this script ran: for every model name, timm's model of the same function (the paper models
with the authors' constructor arguments, the CPU models as timm's VisionTransformer / ResNet classes
at their sizes) gets weights drawn by `state_dict` below from a seed (NumPy only, so the test
draws the same ones), runs a few seeded inputs in float64 in eval mode and, for BatchNorm
models, in train mode (batch statistics), and the logits are stored. The fixture holds only the
state dict's keys and shapes, the seed, checksums of the drawn weights and inputs, and logits: a
few kilobytes per model. The test loads the weights through `pf_jax.models.from_torch`.

Weights are drawn at realistic scales (He-scaled convolutions, 1/sqrt(fan_in) linears, norm
scales near 1, running statistics near the activations' own), so activations stay O(1) and a
1e-5 tolerance on the logits sees any change of the function.
"""

from __future__ import annotations

import json
import os
import sys
import zlib

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")
DIR = os.path.join(DATA, "models")
NUM_CLASSES, SEED = 10, 0
# name -> (batch, image side, input channels): small, yet every padding and pooling is exercised
# (ResNets at 32: stem 16, max-pool 8, stages 8, 4, 2, 1; ViTs: 4 tokens, vit_ti4 16).
SIZES = {
  "vit_s32": (4, 64, 3),
  "vit_s16": (4, 32, 3),
  "vit_ti4": (4, 16, 3),
  "vit_digits": (4, 8, 1),
  "resnet50": (4, 32, 3),
  "resnet101": (4, 32, 3),
  "resnet_tiny": (4, 8, 1),
}


def _rng(seed: int, key: str) -> np.random.RandomState:
  """A stream per (seed, key): RandomState's streams are fixed across NumPy versions."""
  return np.random.RandomState((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**32)


def _uniform(rng, shape, std):
  """Uniform with standard deviation `std` (cheaper to draw than normal)."""
  return ((rng.random_sample(shape) * 2 - 1) * (np.sqrt(3.0) * std)).astype(np.float32)


def state_dict(keys_and_shapes, seed: int = SEED) -> dict:
  """Weights for a timm state dict's (key, shape) pairs, drawn from `seed` (NumPy only)."""
  # The last BatchNorm of a residual block (bn3 of a bottleneck, bn2 of a basic block) gets a
  # small scale, as in trained nets (timm starts it at zero): the residual stream stays O(1).
  bottleneck = any(".bn3." in k for k, _ in keys_and_shapes)
  last_bn = ".bn3.weight" if bottleneck else ".bn2.weight"
  sd = {}
  for key, shape in keys_and_shapes:
    shape, rng = tuple(shape), _rng(seed, key)
    if key.endswith("running_var"):
      w = 1.0 + rng.random_sample(shape)
    elif key.endswith("running_mean"):
      w = _uniform(rng, shape, 0.3)
    elif len(shape) == 4:  # conv [out, in, kh, kw]: He over fan-in (ReLU nets), 1/fan_in (ViT)
      fan_in = int(np.prod(shape[1:]))
      w = _uniform(rng, shape, np.sqrt((1.0 if key.startswith("patch") else 2.0) / fan_in))
    elif key == "pos_embed":
      w = _uniform(rng, shape, 0.5)
    elif len(shape) == 2:  # linear [out, in]
      w = _uniform(rng, shape, 1.0 / np.sqrt(shape[1]))
    elif key.startswith("layer") and key.endswith(last_bn):
      w = 0.3 + _uniform(rng, shape, 0.05)
    elif key.endswith("weight"):  # norm scales
      w = 1.0 + _uniform(rng, shape, 0.1)
    else:  # biases, norm shifts
      w = _uniform(rng, shape, 0.1)
    sd[key] = np.asarray(w, np.float32)
  return sd


def inputs(name: str, seed: int = SEED) -> np.ndarray:
  """The fixture's NHWC input batch for model `name`, roughly unit scale."""
  batch, side, channels = SIZES[name]
  return _uniform(_rng(seed, "inputs/" + name), (batch, side, side, channels), 1.0)


def path(name: str) -> str:
  return os.path.join(DIR, f"{name}.npz")


def load(name: str) -> dict:
  """A fixture: {"keys": [(key, shape)], "seed", "weights_sum", "inputs_sum", "eval", "train"?}."""
  with np.load(path(name)) as f:
    out = {k: f[k] for k in f.files}
  out["keys"] = json.loads(str(out["keys"]))
  return out


def checksum(arrays) -> float:
  """sum |x| over arrays, float64: tells a changed NumPy stream from a changed model."""
  return float(sum(np.abs(np.asarray(a, np.float64)).sum() for a in arrays))


def timm_twin(name: str):
  """timm's model computing pf_jax model `name` at the fixture's size (float32, CPU)."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import resnet as timm_resnet  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top

  from benchmarks import equivalence  # pylint: disable=g-import-not-at-top

  _, side, channels = SIZES[name]
  kw = {"num_classes": NUM_CLASSES, "in_chans": channels}
  if name in equivalence.TIMM:  # the authors' models, with their constructor arguments
    timm_name, extra = equivalence.TIMM[name]
    if timm_name.startswith("vit"):
      extra = dict(extra, img_size=side)
    return timm.create_model(timm_name, **kw, **extra)
  vit = {"class_token": False, "global_pool": "avg", "img_size": side, **kw}
  if name == "vit_ti4":
    return VisionTransformer(patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2, **vit)
  if name == "vit_digits":
    return VisionTransformer(patch_size=2, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, **vit)
  if name == "resnet_tiny":  # timm's ResNet of BasicBlocks with our 3x3/1 stem and no max-pool
    net = timm_resnet.ResNet(
      block=timm_resnet.BasicBlock, layers=(1, 1), channels=(16, 32), stem_width=16, **kw
    )
    net.conv1 = torch.nn.Conv2d(channels, 16, 3, padding=1, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(16)
    net.maxpool = torch.nn.Identity()
    net.layer1 = torch.nn.Sequential(timm_resnet.BasicBlock(16, 16))  # built for the 64-wide stem
    net.layer3 = net.layer4 = torch.nn.Identity()  # timm's forward calls all four stages
    return net
  raise ValueError(f"no timm twin for {name!r}")


def make(name: str) -> dict:
  """The fixture of model `name`, computed by timm in float64 from float32 weights."""
  import torch  # pylint: disable=g-import-not-at-top

  net = timm_twin(name)
  keys = [(k, list(v.shape)) for k, v in net.state_dict().items() if v.is_floating_point()]
  sd = state_dict(keys, SEED)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  net = net.double()
  x = inputs(name)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))
  out = {
    "keys": np.array(json.dumps(keys)),
    "seed": np.array(SEED),
    "weights_sum": np.array(checksum(sd.values())),
    "inputs_sum": np.array(checksum([x])),
  }
  modes = ("eval", "train") if any(k.endswith("running_var") for k, _ in keys) else ("eval",)
  for mode in modes:
    net.train(mode == "train")
    with torch.no_grad():
      out[mode] = net(xt).numpy().astype(np.float32)
  return out


def main(names=()):
  from pf_jax import models  # pylint: disable=g-import-not-at-top

  os.makedirs(DIR, exist_ok=True)
  for name in names or models.model_names():
    fixture = make(name)
    np.savez_compressed(path(name), **fixture)
    scale = {m: float(np.abs(fixture[m]).max()) for m in ("eval", "train") if m in fixture}
    print(f"{name}: {os.path.getsize(path(name))} bytes, max |logit| {scale}")
  total = sum(os.path.getsize(os.path.join(DIR, f)) for f in os.listdir(DIR))
  print(f"total {total} bytes in {DIR}")


if __name__ == "__main__":
  main(sys.argv[1:])
