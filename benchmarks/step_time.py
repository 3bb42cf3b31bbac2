"""Step-time ratios of SAM-family steps over the base optimizer's step, measured in one run.

  python benchmarks/step_time.py [--batch 256] [--steps 30] [--m 64]

Prints median seconds per step and the ratio to the base AdamW step, for m = the whole batch
(one perturbation: two forward/backward passes, ideally ~2x) and for m = --m (batch / m
perturbations: the perturbed weights differ per chunk, so vmap turns convolutions into grouped
ones and scan runs chunks one after another). Wall-clock on a shared CPU is noisy: only ratios
from the same run are meaningful.
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import pf_jax
from pf_jax import models


class SmallCNN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(128)(x)))


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--m", type=int, default=64)
  parser.add_argument("--image", type=int, default=16)
  parser.add_argument(
    "--model",
    default="cnn",
    help="cnn (a 2-layer CNN) or a pf_jax.models name without BatchNorm, e.g. vit_ti4",
  )
  args = parser.parse_args()

  model = SmallCNN() if args.model == "cnn" else models.build_model(args.model, num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.image, args.image, 3))
  y = jnp.arange(args.batch) % 10
  params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
  apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
  loss_fn = pf_jax.sigmoid_cross_entropy
  base = optax.chain(optax.clip_by_global_norm(1.0), pf_jax.adamw(1e-3, weight_decay=0.3))

  def base_step(p, s):
    g = jax.grad(lambda q: loss_fn(apply_fn(q, x), y))(p)
    u, s = base.update(g, s, p)
    return optax.apply_updates(p, u), s

  variants = {
    "base (AdamW)": (base, base_step),
  }
  obf = pf_jax.obf(0.1, 1.0, "sigmoid")
  m_all, m = args.batch, args.m
  for name, kw in {
    f"SAM-steep m={m_all}": dict(rho=0.6, m=m_all),
    f"OBF-SAM m={m_all}": dict(rho=0.6, objective=obf, m=m_all),
    f"GSAM-steep m={m_all}": dict(rho=0.6, gsam_alpha=0.4, m=m_all),
    f"GSAM-OBF m={m_all}": dict(rho=0.6, gsam_alpha=0.4, objective=obf, m=m_all),
    f"OBF-SAM m={m} vmap": dict(rho=0.6, objective=obf, m=m),
    f"GSAM-steep m={m} vmap": dict(rho=0.6, gsam_alpha=0.4, m=m),
    f"OBF-SAM m={m} scan": dict(rho=0.6, objective=obf, m=m, chunk_mode="scan"),
    f"OBF-SAM m={m} unroll": dict(rho=0.6, objective=obf, m=m, chunk_mode="unroll"),
  }.items():
    tx = pf_jax.sam(base, pf_jax.SamSpec(**kw), loss_fn)
    forward = lambda q, batch: apply_fn(q, batch[0])

    def step(p, s, tx=tx, forward=forward):
      g = jax.grad(lambda q: loss_fn(forward(q, (x, y)), y))(p)
      u, s = tx.update(g, s, p, forward=forward, batch=(x, y))
      return optax.apply_updates(p, u), s

    variants[name] = (tx, step)

  times = {}
  for name, (tx, step) in variants.items():
    step = jax.jit(step)
    p, s = params, tx.init(params)
    p, s = step(p, s)
    jax.block_until_ready(p)
    samples = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      p, s = step(p, s)
      jax.block_until_ready(p)
      samples.append(time.perf_counter() - t0)
    times[name] = statistics.median(samples)

  print(
    f"model={args.model} backend={jax.default_backend()} batch={args.batch} m={args.m} image={args.image} steps={args.steps}"
  )
  ref = times["base (AdamW)"]
  for name, t in times.items():
    print(f"{name:24s} {1e3 * t:8.2f} ms/step  ratio {t / ref:5.2f}")


if __name__ == "__main__":
  main()
