"""A plain sequential NumPy re-implementation of the design page, for the tests.

Tiny MLP z = W2 tanh(W1 x + b1) + b2 with hand-written backprop (no JAX autodiff), float64.
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
  """dL/dz for the mean-over-batch loss (sum over classes for sigmoid)."""
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
  return sum(float(np.sum(a[k] * b[k])) for k in KEYS)


def tnorm(a):
  return np.sqrt(tdot(a, a))


def perturb(p, x, y, *, loss, rho, objective, obf_kw=None, asam=None, eta=0.0):
  """Steps 1-4 on one chunk: (theta^p, g_p, d)."""
  z, _ = forward(p, x)
  dz = loss_dz(loss, z, y) if objective == "steepest" else obf_dz(z, y, **obf_kw)
  gp = backprop(p, x, dz)
  w = {k: np.abs(p[k]) + eta for k in KEYS}
  if asam in ("before", "both"):
    gp = {k: w[k] * gp[k] for k in KEYS}
  n = tnorm(gp)
  d = {k: gp[k] / (n + EPS) for k in KEYS}
  if asam in ("after", "both"):
    d = {k: w[k] * d[k] for k in KEYS}
  return {k: p[k] + rho * d[k] for k in KEYS}, gp, d


def chunk_grad(
  p, x, y, *, loss, rho, objective, obf_kw=None, xi=0.0, norm_backup=False, asam=None, eta=0.0
):
  pt, gp, d = perturb(
    p, x, y, loss=loss, rho=rho, objective=objective, obf_kw=obf_kw, asam=asam, eta=eta
  )
  zt, _ = forward(pt, x)
  g = backprop(pt, x, loss_dz(loss, zt, y))
  if xi:
    b = d if norm_backup else gp
    gn = tnorm(g)
    u = {k: g[k] / (gn + EPS) for k in KEYS}
    bu = tdot(b, u)
    g = {k: g[k] - xi * (b[k] - bu * u[k]) for k in KEYS}
  return g


def sam_grad(p, x, y, m, **kw):
  """Mean over consecutive chunks of m examples of the per-chunk gradient."""
  grads = [chunk_grad(p, x[i : i + m], y[i : i + m], **kw) for i in range(0, len(y), m)]
  return {k: np.mean([g[k] for g in grads], axis=0) for k in KEYS}
