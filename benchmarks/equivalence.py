"""pf_jax against the paper authors' PyTorch stack (timm models, their train.py's step).

  python -m benchmarks.equivalence            # prints the table, writes results/equivalence.md

Needs torch and timm (`pip install -e .[bench]`). Two measurements:

* logits: each paper model and timm's model of the same name, from the same weights
  (`pf_jax.models.from_torch`), in eval mode (BatchNorm running statistics) and train mode (batch
  statistics); the relative error is max|jax - torch| / max|torch| over the logits;
* training: 5 steps of pf_jax's compiled training step (`pf_jax.train.make_train_step` with the
  optimizer, schedules, weight-decay groups, clipping, rho schedule, m-chunks and gradient
  accumulation of the paper config's row) against `torch_run`, a PyTorch loop following the
  authors' train.py (their SAM optimizer's chunk loop through `benchmarks/torch_sam.py`, their
  OBF with sigmoid predictions, their AdamW/SGDW parameter groups, warmup-linear scheduler, rho
  generator, clipping, gradient accumulation and shrink-and-perturb), from the same weights on the
  same batches. Model, image and batch are reduced (ViT: timm VisionTransformer of `vit_digits`'
  shape on 8x8 images; ResNet: timm's Bottleneck ResNet, one block per stage, 8-64 channels, on
  64x64 images, learning rates / 100); 16 images per step as 2 accumulated micro-batches of two m = 4 chunks each;
  the schedules are compressed to 2 warmup steps of 6. The ResNet rows run in float64 on both
  sides (`FLOAT64`): in float32 the tiny ResNet's BatchNorm backward over its last stage's few
  values per channel loses up to 1e-2 of some gradients to rounding in XLA's float32 reductions
  (PyTorch's CPU BatchNorm kernel accumulates in double), which would hide the semantics. Our
  side is then float64 throughout (head, learning rate and rho included): a float32 part leaves
  ~1e-8 differences, enough to flip a ReLU whose input is within 1e-8 of 0 (the ASAM row had
  one, and a 1.4e-2 gap from it).
  Errors: `params` = max|theta_jax - theta_torch| / max|theta_torch| after the 5 steps (the
  criterion, <= 1e-4); `update` = ||delta_jax - delta_torch|| / ||delta_torch|| of the total
  change from the initial weights (stricter: it sees differences in the small moves).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
import torch.nn.functional as F

from benchmarks import torch_sam
from pf_jax import experiment
from pf_jax import models
from pf_jax import train
from pf_jax.models import resnet as resnet_lib
from pf_jax.models import torch_weights

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


# -- The training step ----------------------------------------------------------------------------

STEPS, WARMUP, TOTAL = 5, 2, 6
BATCH, ACCUM, M, NUM_CLASSES = 16, 2, 4, 10
# Table 1's method rows (plus the Appendix B baselines), by each config file's method names.
ROWS = {
  "vit_s32_imagenet": [
    ("SAM-OBF", "sam_obf"),
    ("GSAM-OBF", "gsam_obf"),
    ("ASAM-OBF", "asam_obf"),
    ("AdamW", "adamw"),
    ("SAM", "sam_steep"),
    ("GSAM", "gsam_steep"),
    ("ASAM", "asam_steep"),
    ("random", "random"),
    ("label smoothing", "label_smooth"),
    ("shrink-and-perturb", "shrink_perturb"),
  ],
  "resnet50_imagenet": [
    ("SAM-OBF", "sam_obf"),
    ("SGD", "sgd"),
    ("GSAM", "gsam_steep"),
    ("ASAM-OBF", "asam_obf"),
    ("SAM", "sam_steep"),
    ("GSAM-OBF", "gsam_obf"),
    ("ASAM", "asam_steep"),
    ("random", "random"),
    ("label smoothing", "label_smooth"),
    ("shrink-and-perturb", "shrink_perturb"),
  ],
}
_MINI_RESNET = {"stage_sizes": (1, 1, 1, 1), "num_filters": 8, "stem_filters": 64}
# Rows computed in float64 by both sides (see the module docstring).
FLOAT64 = ("resnet50_imagenet",)


def reduced_config(config_name: str, method: str):
  """The paper config's row with model, image, batch and schedule horizon reduced."""
  c = importlib.import_module(f"configs.{config_name}").get_config(method)
  c.global_batch_size, c.grad_accum_steps = BATCH, ACCUM
  c.mixed_precision = False
  if c.sam.perturbation != "none":
    c.sam.m = M
  if c.model.startswith("vit"):
    c.model, c.image_size = "vit_digits", 8
  else:
    # At lr 1.6 the tiny ResNet on random data is chaotic: two PyTorch runs of it, float32 and
    # float64, end 48% apart after 5 steps, so no comparison could see anything. 1/100 of the
    # learning rates (same schedule shape, same rho policy) keeps rounding from being amplified.
    c.image_size = 64
    c.lr_max, c.lr_min = c.lr_max / 100, c.lr_min / 100
  return c


def _models(config, dtype=jnp.float32):
  """(pf_jax model, timm model) of the reduced size computing in `dtype` (the ResNet in float64
  throughout, its head included), timm's randomized (seed 0) from float32 values."""
  if config.model == "vit_digits":
    net = timm_model("vit_digits", NUM_CLASSES, config.image_size)
    model = models.build_model(
      config.model, num_classes=NUM_CLASSES, head_bias_init=config.head_bias_init, dtype=jnp.float32
    )
    rule = torch_weights._vit_rule  # pylint: disable=protected-access
  else:
    from timm.models.resnet import Bottleneck  # pylint: disable=g-import-not-at-top
    from timm.models.resnet import ResNet  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    net = ResNet(Bottleneck, (1, 1, 1, 1), channels=(8, 16, 32, 64), num_classes=NUM_CLASSES)
    model = resnet_lib.ResNet(num_classes=NUM_CLASSES, dtype=dtype, **_MINI_RESNET)
    rule = torch_weights.resnet_rule(_MINI_RESNET["stage_sizes"])
  randomize(net)
  net = net.to(torch.float64 if dtype == jnp.float64 else torch.float32)
  shape = (1, config.image_size, config.image_size, 3)
  to_jax = lambda sd: torch_weights.convert(config.model, model, shape, rule, sd)
  return model, net, to_jax


def _batches(config, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(STEPS, BATCH, config.image_size, config.image_size, 3)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, size=(STEPS, BATCH)).astype(np.int32)
  return x, y


def jax_run(config, model, variables, batches):
  """STEPS steps of pf_jax's compiled training step; returns the final variables."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (train.AXIS,))
  config.num_train_steps, config.warmup_steps = TOTAL, WARMUP
  exp = experiment.build(config, num_classes=NUM_CLASSES, num_train_examples=BATCH, num_devices=1)
  exp = dataclasses.replace(exp, model=model, has_batch_norm=bool(variables["batch_stats"]))
  step = train.make_train_step(exp, mesh)
  params = jax.tree.map(jnp.asarray, variables["params"])
  stats = jax.tree.map(jnp.asarray, variables["batch_stats"])
  dtype = jax.tree.leaves(params)[0].dtype
  state = exp.state_at(params, stats)
  for x, y in zip(*batches):
    state, _ = step(state, {"image": jnp.asarray(x, dtype), "label": jnp.asarray(y)})
  return {"params": state.params, "batch_stats": state.batch_stats}


# The authors' train.py, re-expressed: their scheduler, rho generator, losses and optimizers.


def authors_lr(config, t: int) -> float:
  """LinearLRScheduler at update t (warmup from --warmup-lr 0, then linear to --min-lr)."""
  if t < WARMUP:
    return config.lr_max * t / WARMUP
  return config.lr_min + (config.lr_max - config.lr_min) * (
    1 - (t - WARMUP) / max(1, TOTAL - WARMUP)
  )


def authors_rho(config, lr: float) -> float:
  """RhoGenerator: 'constant' rho, or 'lr_prop' between --min-rho and --rho."""
  s = config.sam
  if s.rho_min is None:
    return s.rho_max
  frac = (lr - config.lr_min) / (config.lr_max - config.lr_min)
  return max(0.0, frac * (s.rho_max - s.rho_min) + s.rho_min)


def authors_loss(config):
  """--bce-loss (BinaryCrossEntropy, reduction 'sum_mean', smoothing to 1/C) or CrossEntropyLoss."""
  s = config.label_smoothing
  if config.loss == "sigmoid_xent":

    def bce(logits, y):
      t = F.one_hot(y.long(), logits.shape[-1]).to(logits.dtype)
      t = (1 - s) * t + s / logits.shape[-1] if s else t
      return F.binary_cross_entropy_with_logits(logits, t, reduction="sum") / logits.shape[0]

    return bce
  return lambda logits, y: F.cross_entropy(logits, y.long(), label_smoothing=s)


def authors_spec(config, rho: float) -> torch_sam.Spec:
  """Their SAM optimizer's settings: OutputBiasForget always with sigmoid predictions (its
  default, which train.py keeps), ASAM's |theta| without an eta, --backup-normalized."""
  s = config.sam
  objective = s.perturbation
  if objective == "obf":
    objective = torch_sam.Obf(lam=s.obf_lambda, gamma=s.obf_gamma, predictions="sigmoid")
  same = {k: s[k] for k in ("m", "gsam_alpha", "gsam_normalized_backup")}  # the config's names
  return torch_sam.Spec(
    rho=rho, objective=objective, asam=None if s.asam == "none" else s.asam, asam_eta=0.0, **same
  )


class _Optimizer:
  """torch.optim.AdamW, or their SGDW (theta *= 1 - lr wd; buf = m buf + g; theta -= lr buf), on
  their parameter groups: no decay on 1-D parameters, biases and `no_weight_decay()` names."""

  def __init__(self, config, net):
    skip = net.no_weight_decay() if hasattr(net, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in net.named_parameters():
      (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    groups = [
      {"params": no_decay, "weight_decay": 0.0},
      {"params": decay, "weight_decay": config.weight_decay},
    ]
    self.c, self.groups = config, groups
    if config.optimizer == "adamw":
      self.adamw = torch.optim.AdamW(groups, lr=0.0, betas=(config.b1, config.b2), eps=1e-8)
    self.buf = {}

  @torch.no_grad()
  def step(self, lr: float):
    if self.c.optimizer == "adamw":
      for g in self.adamw.param_groups:
        g["lr"] = lr
      self.adamw.step()
      return
    for group in self.groups:
      for p in group["params"]:
        p.mul_(1.0 - lr * group["weight_decay"])
        b = self.buf.get(p)
        self.buf[p] = b = p.grad.clone() if b is None else b.mul_(self.c.momentum).add_(p.grad)
        p.add_(b, alpha=-lr)


def torch_run(config, net, batches):
  """STEPS updates of the authors' train_one_epoch: per update, shrink-and-perturb of the whole
  state dict toward the initial one, then per micro-batch their SAM backward (or a plain
  backward), gradients averaged over micro-batches, clip_grad_norm_, optimizer step."""
  net.train()
  loss_fn, opt = authors_loss(config), _Optimizer(config, net)
  params = [p for p in net.parameters() if p.requires_grad]
  init = copy.deepcopy(net.state_dict()) if config.shrink_perturb else None
  for t, (x, y) in enumerate(zip(*batches)):
    lr = authors_lr(config, t)
    if config.shrink_perturb:
      f = config.shrink_perturb * lr / config.lr_max
      with torch.no_grad():
        for k, v in net.state_dict().items():
          if v.is_floating_point():
            v.copy_(f * init[k] + (1 - f) * v)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(params[0].dtype)
    y = torch.from_numpy(y.astype(np.int64))
    total = [torch.zeros_like(p) for p in params]
    for xm, ym in zip(x.chunk(config.grad_accum_steps), y.chunk(config.grad_accum_steps)):
      if config.sam.perturbation == "none":
        for p in params:
          p.grad = None
        loss_fn(net(xm), ym).backward()
        grads = [p.grad.detach().clone() for p in params]
      else:
        grads, _ = torch_sam.sam_gradient(
          net, loss_fn, xm, ym, authors_spec(config, authors_rho(config, lr))
        )
      total = [a + g / config.grad_accum_steps for a, g in zip(total, grads)]
    for p, g in zip(params, total):
      p.grad = g
    if config.clip_grad_norm:
      torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
    opt.step(lr)
  return net


def _flat(tree):
  return {
    k: np.asarray(v, np.float64) for k, v in flax.traverse_util.flatten_dict(tree, sep="/").items()
  }


def step_errors(config_name: str, method: str) -> dict[str, float]:
  """{"params": ..., "update": ..., "batch_stats": ...} relative errors after STEPS steps."""
  if config_name in FLOAT64:
    with jax.enable_x64(True):
      return _step_errors(config_name, method, jnp.float64)
  return _step_errors(config_name, method, jnp.float32)


def _step_errors(config_name, method, dtype):
  c = reduced_config(config_name, method)
  model, net, to_jax = _models(c, dtype)
  sd0 = copy.deepcopy(net.state_dict())
  init = jax.tree.map(lambda a: np.asarray(a, dtype), to_jax(sd0))
  batches = _batches(c)
  ours = jax_run(c, model, init, batches)
  # theirs = init + their change: `to_jax` rounds to float32, so convert the change, not the sum.
  sd = torch_run(c, net, batches).state_dict()
  delta = to_jax({k: v - sd0[k] if v.is_floating_point() else v for k, v in sd.items()})
  theirs = jax.tree.map(lambda a, d: a + np.asarray(d, np.float64), init, delta)
  a, b, a0 = _flat(ours["params"]), _flat(theirs["params"]), _flat(init["params"])
  diff = max(np.abs(a[k] - b[k]).max() for k in a)
  scale = max(np.abs(b[k]).max() for k in b)
  num = np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
  den = np.sqrt(sum(((b[k] - a0[k]) ** 2).sum() for k in b))
  out = {"params": float(diff / scale), "update": float(num / max(den, 1e-30))}
  if ours["batch_stats"]:
    sa, sb = _flat(ours["batch_stats"]), _flat(theirs["batch_stats"])
    out["batch_stats"] = max(rel_err(sa[k], sb[k]) for k in sa)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/equivalence.md")
  parser.add_argument("--skip-large", action="store_true", help="logits: only vit_s32, resnet50")
  parser.add_argument("--only", choices=[*ROWS, "logits"], help="one part of the table")
  parser.add_argument("--rows", default="", help="comma-separated method names (default: all)")
  args = parser.parse_args()
  torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
  lines = [
    "# pf_jax vs the authors' PyTorch stack (`python -m benchmarks.equivalence`)",
    "",
    f"torch {torch.__version__}, timm {timm.__version__}, jax {jax.__version__}; CPU, float32 "
    "(training rows of ResNet configs: float64 on both sides).",
    "",
    "## Logits, same weights (64x64 images, batch 4, 10 classes): max|jax - torch| / max|torch|",
    "",
    "| model | timm model | eval | train |",
    "|---|---|---|---|",
  ]
  names = ["vit_s32", "resnet50"] + ([] if args.skip_large else ["vit_s16", "resnet101"])
  names = names if args.only in (None, "logits") else []
  for name in names:
    e = logits_errors(name, image_size=64, batch=4)
    lines.append(
      f"| {name} | {TIMM[name][0]} {TIMM[name][1] or ''} | {e['eval']:.1e} | {e['train']:.1e} |"
    )
    print(lines[-1], flush=True)
  lines += [
    "",
    f"## Training, {STEPS} steps from the same weights on the same batches",
    "",
    "`params`: max|theta_jax - theta_torch| / max|theta_torch| (criterion <= 1e-4); `update`: "
    "||delta_jax - delta_torch|| / ||delta_torch|| of the change from the initial weights; "
    "`batch_stats`: max relative error of the BatchNorm running statistics.",
    "",
    "| config | row | method | params | update | batch_stats | s |",
    "|---|---|---|---|---|---|---|",
  ]
  for config_name, rows in ROWS.items():
    if args.only not in (None, config_name):
      continue
    for label, method in rows:
      if args.rows and method not in args.rows.split(","):
        continue
      start = time.time()
      e = step_errors(config_name, method)
      bs = f"{e['batch_stats']:.1e}" if "batch_stats" in e else "-"
      lines.append(
        f"| {config_name} | {label} | {method} | {e['params']:.1e} | {e['update']:.1e} | {bs} "
        f"| {time.time() - start:.0f} |"
      )
      print(lines[-1], flush=True)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
