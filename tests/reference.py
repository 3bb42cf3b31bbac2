"""A plain sequential NumPy re-implementation of the design page, for the tests.

Tiny MLP z = W2 tanh(W1 x + b1) + b2 with hand-written backprop (no JAX autodiff), float64.
The second half re-implements a whole training step (tests/test_train_reference.py): a net with
an optional BatchNorm layer, label smoothing, the base optimizers, clipping, schedules and
shrink-and-perturb, all written from their definitions (paper Appendix C, optax's docs).
"""

import numpy as np

EPS = 1e-12
KEYS = ("W1", "b1", "W2", "b2")


def init_mlp(rng, d_in, d_hidden, n_classes):
  return dict(
    W1=rng.normal(size=(d_in, d_hidden)) / np.sqrt(d_in),
    b1=0.1 * rng.normal(size=d_hidden),
    W2=rng.normal(size=(d_hidden, n_classes)) / np.sqrt(d_hidden),
    b2=0.1 * rng.normal(size=n_classes),
  )


def forward(p, x):
  h = np.tanh(x @ p["W1"] + p["b1"])
  return h @ p["W2"] + p["b2"], h


def backprop(p, x, dz):
  """Gradient of sum(dz * z(p, x)) with respect to p."""
  _, h = forward(p, x)
  dh = dz @ p["W2"].T * (1.0 - h**2)
  return dict(W1=x.T @ dh, b1=dh.sum(0), W2=h.T @ dz, b2=dz.sum(0))


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def onehot(y, c):
  return np.eye(c)[y]


def loss_dz(loss, z, y, smoothing=0.0):
  """dL/dz for the mean-over-batch loss (sum over classes for sigmoid), targets smoothed."""
  c = z.shape[-1]
  t = (1 - smoothing) * onehot(y, c) + smoothing / c
  p = softmax(z) if loss == "softmax" else sigmoid(z)
  return (p - t) / len(y)


def loss(name, p, x, y):
  """The task loss at p: mean over the batch (summed over classes for sigmoid)."""
  z = forward(p, x)[0]
  t = onehot(y, z.shape[-1])
  if name == "softmax":
    return -np.mean(np.sum(t * np.log(softmax(z)), -1))
  q = sigmoid(z)
  return -np.mean(np.sum(t * np.log(q) + (1 - t) * np.log(1 - q), -1))


def obf_dz(z, y, predictions, lam=None, gamma=None, alpha=None):
  c = z.shape[-1]
  p = softmax(z) if predictions == "softmax" else sigmoid(z)
  if alpha is None:
    p_y = p[np.arange(len(y)), y]
    alpha = (
      gamma * np.ones_like(p_y) if lam == 0 else gamma * np.maximum((1 - lam / p_y) / (1 - lam), 0)
    )
  else:
    alpha = np.full(len(y), alpha)
  a = alpha[:, None]
  return (1.0 / c - a * p - (1 - a) * onehot(y, c)) / len(y)


def tdot(a, b):
  return sum(float(np.sum(a[k] * b[k])) for k in a)


def tnorm(a):
  return np.sqrt(tdot(a, a))


def mlp_forward(p, x):
  """(logits, cache) of the tanh MLP: the model interface of `perturb` / `chunk_grad`."""
  z, _ = forward(p, x)
  return z, x


def mlp_backprop(p, cache, dz):
  return backprop(p, cache, dz)


def perturb(
  p,
  x,
  y,
  *,
  loss,
  rho,
  objective,
  obf_kw=None,
  asam=None,
  eta=0.0,
  smoothing=0.0,
  gp=None,
  model=(mlp_forward, mlp_backprop),
):
  """Steps 1-4 on one chunk: (theta^p, g_p, d, logits at theta, cache at theta).

  `gp` (objective "random"): the ascent direction, given. `model` = (forward, backprop).
  """
  fwd, bwd = model
  z, cache = fwd(p, x)
  if gp is None:
    if objective == "steepest":
      dz = loss_dz(loss, z, y, smoothing)
    else:
      dz = obf_dz(z, y, **obf_kw)
    gp = bwd(p, cache, dz)
  w = {k: np.abs(p[k]) + eta for k in p}
  if asam in ("before", "both"):
    gp = {k: w[k] * gp[k] for k in p}
  n = tnorm(gp)
  d = {k: gp[k] / (n + EPS) for k in p}
  if asam in ("after", "both"):
    d = {k: w[k] * d[k] for k in p}
  return {k: p[k] + rho * d[k] for k in p}, gp, d, z, cache


def chunk_grad(p, x, y, *, xi=0.0, norm_backup=False, **kw):
  """Steps 1-6 on one chunk: the SAM-family gradient g (kw: those of `perturb`)."""
  fwd, bwd = kw.get("model", (mlp_forward, mlp_backprop))
  pt, gp, d, _, _ = perturb(p, x, y, **kw)
  zt, cache_t = fwd(pt, x)
  g = bwd(pt, cache_t, loss_dz(kw["loss"], zt, y, kw.get("smoothing", 0.0)))
  if xi:
    b = d if norm_backup else gp
    gn = tnorm(g)
    u = {k: g[k] / (gn + EPS) for k in p}
    bu = tdot(b, u)
    g = {k: g[k] - xi * (b[k] - bu * u[k]) for k in p}
  return g


def sam_grad(p, x, y, m, **kw):
  """Mean over consecutive chunks of m examples of the per-chunk gradient."""
  grads = [chunk_grad(p, x[i : i + m], y[i : i + m], **kw) for i in range(0, len(y), m)]
  return {k: np.mean([g[k] for g in grads], axis=0) for k in KEYS}


# ---------------------------------------------------------------------------------------------
# A whole training step. The net: x (flattened image) -> x + pos_embedding -> hidden (dense)
# -> [BatchNorm] -> tanh -> head (dense). Parameters are a flat dict keyed "module/name".

BN_MOMENTUM, BN_EPS = 0.9, 1e-5


def init_net(rng, d_in, d_hidden, n_classes, batch_norm):
  p = {
    "pos_embedding": 0.1 * rng.normal(size=(1, d_in)),
    "hidden/kernel": rng.normal(size=(d_in, d_hidden)) / np.sqrt(d_in),
    "hidden/bias": 0.1 * rng.normal(size=d_hidden),
    "head/kernel": rng.normal(size=(d_hidden, n_classes)) / np.sqrt(d_hidden),
    "head/bias": 0.1 * rng.normal(size=n_classes),
  }
  stats = {}
  if batch_norm:
    p.update(
      {"bn/scale": 1 + 0.1 * rng.normal(size=d_hidden), "bn/bias": 0.1 * rng.normal(size=d_hidden)}
    )
    stats = {"bn/mean": 0.1 * rng.normal(size=d_hidden), "bn/var": 1 + 0.1 * rng.random(d_hidden)}
  return p, stats


def net_forward(p, x):
  """(logits, cache); BatchNorm (if the net has one) normalizes with this batch's statistics."""
  x1 = x.reshape(len(x), -1) + p["pos_embedding"]
  a = x1 @ p["hidden/kernel"] + p["hidden/bias"]
  cache = {"x1": x1, "a": a}
  if "bn/scale" in p:
    mu, var = a.mean(0), a.var(0)
    ahat = (a - mu) / np.sqrt(var + BN_EPS)
    cache.update(mu=mu, var=var, ahat=ahat)
    a = p["bn/scale"] * ahat + p["bn/bias"]
  h = np.tanh(a)
  cache["h"] = h
  return h @ p["head/kernel"] + p["head/bias"], cache


def net_backprop(p, cache, dz):
  """Gradient of sum(dz * logits) (BatchNorm's batch statistics differentiated through)."""
  h, x1 = cache["h"], cache["x1"]
  g = {"head/kernel": h.T @ dz, "head/bias": dz.sum(0)}
  da = dz @ p["head/kernel"].T * (1 - h**2)
  if "bn/scale" in p:
    ahat = cache["ahat"]
    g["bn/scale"], g["bn/bias"] = (da * ahat).sum(0), da.sum(0)
    dhat = da * p["bn/scale"]
    da = (dhat - dhat.mean(0) - ahat * (dhat * ahat).mean(0)) / np.sqrt(cache["var"] + BN_EPS)
  g["hidden/kernel"], g["hidden/bias"] = x1.T @ da, da.sum(0)
  g["pos_embedding"] = (da @ p["hidden/kernel"].T).sum(0, keepdims=True)
  return g


NET = (net_forward, net_backprop)


def lr_at(t, *, lr_max, lr_min, warmup, total):
  """Linear warmup 0 -> lr_max over `warmup` steps, then linear decay to lr_min at `total`."""
  if t < warmup:
    return lr_max * t / warmup
  return lr_max + (lr_min - lr_max) * min((t - warmup) / max(total - warmup, 1), 1.0)


def rho_at(lr, *, rho_max, rho_min, lr_max, lr_min):
  """Constant rho_max (rho_min < 0), else proportional to the learning rate (GSAM's policy)."""
  if rho_min < 0:
    return rho_max
  return max(0.0, rho_min + (lr - lr_min) / (lr_max - lr_min) * (rho_max - rho_min))


def pieces(x, y, *, num_devices, accum, m):
  """(device, micro-batch, chunk, x, y) in the trainer's order: the global batch is sharded over
  devices, each shard cut into `accum` consecutive micro-batches, each into chunks of m (None:
  one chunk)."""
  out = []
  per_dev = len(y) // num_devices
  for dev in range(num_devices):
    xd, yd = x[dev * per_dev : (dev + 1) * per_dev], y[dev * per_dev : (dev + 1) * per_dev]
    size = per_dev // accum
    for a in range(accum):
      xa, ya = xd[a * size : (a + 1) * size], yd[a * size : (a + 1) * size]
      mm = m or size
      for i in range(size // mm):
        out.append((dev, a, i, xa[i * mm : (i + 1) * mm], ya[i * mm : (i + 1) * mm]))
  return out


def step_gradient(
  p, stats, x, y, *, method, loss, smoothing, rho, num_devices, accum, random_dir=None
):
  """(gradient, new BatchNorm running statistics, loss at theta) of one training step.

  method: None (plain gradient; each micro-batch of a device is one forward pass) or a dict of
  `perturb`/`chunk_grad` keywords plus "m". random_dir(dev, micro, chunk) -> g_p for "random".
  Running statistics: each pass at theta updates them with its own batch's mean and variance;
  the step keeps the mean over passes (the perturbed passes' statistics are discarded).
  """
  m = method["m"] if method else None
  grads, new_stats, losses = [], [], []
  for dev, a, i, xc, yc in pieces(x, y, num_devices=num_devices, accum=accum, m=m):
    z, cache = net_forward(p, xc)
    if method is None:
      grads.append(net_backprop(p, cache, loss_dz(loss, z, yc, smoothing)))
    else:
      kw = {k: v for k, v in method.items() if k != "m"}
      if kw["objective"] == "random":
        kw["gp"] = random_dir(dev, a, i)
      grads.append(chunk_grad(p, xc, yc, loss=loss, rho=rho, smoothing=smoothing, model=NET, **kw))
    losses.append(task_loss(loss, z, yc, smoothing))
    if stats:
      new_stats.append(
        {
          "bn/mean": BN_MOMENTUM * stats["bn/mean"] + (1 - BN_MOMENTUM) * cache["mu"],
          "bn/var": BN_MOMENTUM * stats["bn/var"] + (1 - BN_MOMENTUM) * cache["var"],
        }
      )
  mean = lambda trees: {k: np.mean([t[k] for t in trees], axis=0) for k in trees[0]}
  return mean(grads), (mean(new_stats) if stats else {}), float(np.mean(losses))


def task_loss(name, z, y, smoothing=0.0):
  c = z.shape[-1]
  t = (1 - smoothing) * onehot(y, c) + smoothing / c
  if name == "softmax":
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.mean(np.sum(t * logp, -1))
  log_sig = lambda v: -np.logaddexp(0, -v)
  return -np.mean(np.sum(t * log_sig(z) + (1 - t) * log_sig(-z), -1))


def init_opt(p):
  return {
    "mu": {k: np.zeros_like(v) for k, v in p.items()},
    "nu": {k: np.zeros_like(v) for k, v in p.items()},
    "t": 0,
  }


def shrink_perturb(tree, init, *, factor, lr, lr_max):
  """The authors' shrink-and-perturb (their train.py, once per update before its first forward
  pass): every entry of the state dict, parameters and BatchNorm statistics alike, becomes
  f * init + (1 - f) * value with f = factor * lr / lr_max (lr: this update's)."""
  f = factor * lr / lr_max
  return {k: f * init[k] + (1 - f) * v for k, v in tree.items()}


def opt_update(p, g, state, *, opt, lr, decayed, clip=0.0):
  """New parameters: [clip by global norm] -> AdamW / SGDW (decoupled, masked weight decay:
  only the keys in `decayed`).

  opt: dict(name="adamw", b1, b2, eps, wd) or dict(name="sgdw", momentum, wd). lr: this step's.
  """
  if clip:
    n = tnorm(g)
    if n > clip:
      g = {k: v * clip / n for k, v in g.items()}
  state = dict(state, t=state["t"] + 1)
  t, u = state["t"], {}
  if opt["name"] == "adamw":
    b1, b2 = opt["b1"], opt["b2"]
    state["mu"] = {k: b1 * state["mu"][k] + (1 - b1) * g[k] for k in p}
    state["nu"] = {k: b2 * state["nu"][k] + (1 - b2) * g[k] ** 2 for k in p}
    for k in p:
      mh, nh = state["mu"][k] / (1 - b1**t), state["nu"][k] / (1 - b2**t)
      u[k] = mh / (np.sqrt(nh) + opt["eps"])
  else:
    state["mu"] = {k: opt["momentum"] * state["mu"][k] + g[k] for k in p}
    u = dict(state["mu"])
  new = {}
  for k in p:
    step = u[k] + (opt["wd"] * p[k] if k in decayed else 0.0)
    new[k] = p[k] - lr * step
  return new, state
