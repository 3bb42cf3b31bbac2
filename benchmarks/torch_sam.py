"""A PyTorch peer of pf_jax's SAM-family step, for benchmarks/peer.py (torch is optional).

Written from the design contract in docs/sam-family.md (tests/reference.py is the same maths in
NumPy), with a *sequential* loop over m-chunks, the way PyTorch SAM implementations do it. Per
chunk S:

  g_p = grad of the ascent objective on S (task loss, OBF, or N(0, I))
  g_p <- w * g_p  (ASAM "before"/"both", w = |theta| + eta)
  d   = g_p / (||g_p|| + 1e-12);  d <- w * d  (ASAM "after"/"both")
  g   = grad of the task loss on S at theta + rho d
  g  <- g - xi (b - <b, u> u),  u = g / (||g|| + 1e-12),  b = g_p or d  (GSAM)

and the step hands the mean of g over the chunks to global-norm clipping and AdamW (decay on
parameters with ndim > 1 except `pos_embed*`, like pf_jax.adamw's mask). BatchNorm: both passes
run in training mode; only the first pass updates the running statistics.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Obf:
  """Output-bias forgetting objective (docs/sam-family.md): lambda, gamma, predictions."""

  lam: float
  gamma: float = 1.0
  predictions: str = "softmax"

  def coef(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d objective / d logits per example (held fixed): 1/C - alpha p - (1 - alpha) onehot."""
    z = logits.detach()
    c = z.shape[-1]
    p = torch.softmax(z, -1) if self.predictions == "softmax" else torch.sigmoid(z)
    p_y = p.gather(-1, labels[:, None])[:, 0]
    if self.lam == 0:
      alpha = torch.full_like(p_y, self.gamma)
    else:
      alpha = self.gamma * torch.clamp((1 - self.lam / p_y) / (1 - self.lam), min=0)
    onehot = F.one_hot(labels, c).to(z.dtype)
    return 1.0 / c - alpha[:, None] * p - (1 - alpha[:, None]) * onehot


@dataclasses.dataclass(frozen=True)
class Spec:
  """The SAM-family member: the fields of pf_jax.SamSpec that a one-device step uses."""

  rho: float
  objective: str | Obf = "steepest"  # "steepest", "random" or Obf(...)
  m: int | None = None
  gsam_alpha: float = 0.0
  gsam_normalized_backup: bool = False
  asam: str | None = None
  asam_eta: float = 0.0


def softmax_xent(logits, labels):
  return F.cross_entropy(logits, labels)


def sigmoid_xent(logits, labels):
  """Summed over classes, mean over the batch (pf_jax.sigmoid_cross_entropy)."""
  t = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
  return F.binary_cross_entropy_with_logits(logits, t, reduction="sum") / logits.shape[0]


def _dot(a, b):
  return sum((x * y).sum() for x, y in zip(a, b))


def _grads(params):
  return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _zero_grad(params):
  for p in params:
    p.grad = None


class _FrozenBatchNormStats:
  """Within the block, BatchNorm layers normalize with batch statistics but keep their running
  statistics (momentum 0), as pf_jax discards the perturbed pass's statistics."""

  def __init__(self, model):
    self.bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

  def __enter__(self):
    self.saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in self.bns]
    for bn in self.bns:
      bn.momentum = 0.0

  def __exit__(self, *exc):
    for bn, (momentum, tracked) in zip(self.bns, self.saved):
      bn.momentum = momentum
      bn.num_batches_tracked.copy_(tracked)


def sam_gradient(model, loss_fn, inputs, labels, spec: Spec, generator=None):
  """The SAM-family update gradient (mean over chunks), one tensor per model parameter.

  Returns (grads, metrics): metrics holds the mean task loss at theta and at the moved points.
  """
  params = [p for p in model.parameters() if p.requires_grad]
  n = inputs.shape[0]
  m = spec.m or n
  if n % m:
    raise ValueError(f"m={m} must divide the batch {n}")
  total = [torch.zeros_like(p) for p in params]
  loss_sum = perturbed_sum = 0.0
  for start in range(0, n, m):
    x, y = inputs[start : start + m], labels[start : start + m]
    # Steps 1-2: the ascent direction g_p.
    _zero_grad(params)
    with torch.set_grad_enabled(spec.objective != "random"):  # random: loss and BN stats only
      logits = model(x)
      loss = loss_fn(logits, y)
    if spec.objective == "random":
      g_p = [
        torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=generator) for p in params
      ]
    else:
      if spec.objective == "steepest":
        objective = loss
      else:
        objective = (spec.objective.coef(logits, y) * logits).sum(-1).mean()
      objective.backward()
      g_p = _grads(params)
    with torch.no_grad():
      w = [p.abs() + spec.asam_eta for p in params] if spec.asam else None
      if spec.asam in ("before", "both"):
        g_p = [wi * gi for wi, gi in zip(w, g_p)]
      # Steps 3-4: normalize and move to theta + rho d.
      norm = torch.sqrt(_dot(g_p, g_p))
      d = [g / (norm + EPS) for g in g_p]
      if spec.asam in ("after", "both"):
        d = [wi * di for wi, di in zip(w, d)]
      e = [spec.rho * di for di in d]
      for p, ei in zip(params, e):
        p.add_(ei)
    # Step 5: the task-loss gradient at the moved point, on the same chunk.
    _zero_grad(params)
    with _FrozenBatchNormStats(model):
      perturbed_loss = loss_fn(model(x), y)
      perturbed_loss.backward()
    g = _grads(params)
    with torch.no_grad():
      for p, ei in zip(params, e):
        p.sub_(ei)
      # Step 6: GSAM.
      if spec.gsam_alpha:
        b = d if spec.gsam_normalized_backup else g_p
        u_scale = 1.0 / (torch.sqrt(_dot(g, g)) + EPS)
        b_dot_u = _dot(b, g) * u_scale
        xi = spec.gsam_alpha
        g = [gi - xi * (bi - b_dot_u * u_scale * gi) for gi, bi in zip(g, b)]
      for t, gi in zip(total, g):
        t.add_(gi)
    loss_sum += float(loss.detach())
    perturbed_sum += float(perturbed_loss.detach())
  chunks = n // m
  _zero_grad(params)
  grads = [t / chunks for t in total]
  return grads, {"loss": loss_sum / chunks, "perturbed_loss": perturbed_sum / chunks}


def adamw(model, lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8):
  """torch AdamW with pf_jax.adamw's decay mask (no decay on 1-D leaves and pos_embed*)."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if p.ndim <= 1 or "pos_embed" in name else decay).append(p)
  groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
  return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps)


def apply_update(model, optimizer, grads, clip_norm=1.0):
  """Global-norm clipping and the base optimizer's step on the given gradient."""
  params = [p for p in model.parameters() if p.requires_grad]
  for p, g in zip(params, grads):
    p.grad = g
  if clip_norm:
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
  optimizer.step()
  _zero_grad(params)


def sam_step(model, optimizer, loss_fn, inputs, labels, spec: Spec, clip_norm=1.0, generator=None):
  """One training step: the SAM-family gradient, then clipping and the base optimizer."""
  grads, metrics = sam_gradient(model, loss_fn, inputs, labels, spec, generator)
  apply_update(model, optimizer, grads, clip_norm)
  return metrics


def base_step(model, optimizer, loss_fn, inputs, labels, clip_norm=1.0):
  """The base optimizer's step (one forward+backward), for the ratio to SAM."""
  params = [p for p in model.parameters() if p.requires_grad]
  _zero_grad(params)
  loss = loss_fn(model(inputs), labels)
  loss.backward()
  if clip_norm:
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
  optimizer.step()
  _zero_grad(params)
  return {"loss": float(loss.detach())}
