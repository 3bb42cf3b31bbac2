"""Where a ViT's fwd+bwd goes on this backend, and which layer formulations are faster.

  python -m benchmarks.vit_layers [--batch 32] [--image 224] [--rounds 15] [--profile]

Times fwd+bwd (the parameter gradient) in interleaved rounds, medians reported, of:

- the patch embedding: flax's strided `nn.Conv` against pf_jax's `PatchEmbedding` (patchify + one
  matmul, the same parameters);
- one attention block (ViT-S: width 384, 6 heads) in three formulations with the same parameters:
  flax's `MultiHeadDotProductAttention` (token-major einsums), the same module with
  `jax.nn.dot_product_attention` as its `attention_fn`, and a heads-major layout that projects
  straight to [batch, heads, tokens, head_dim] and attends with batched matmuls.

Each variant's outputs are checked against the first one's (float rounding only). `--profile`
also traces the whole ViT-S/32 fwd+bwd and sums the trace's op time by kind (library dot
fusions, layout copies and transposes, elementwise fusions). Ratios from one run are what to
compare; absolute times on a shared machine are inflated.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import peer
from pf_jax import models
from pf_jax.models.vit import PatchEmbedding

WIDTH, HEADS, PATCH = 384, 6, 32


class HeadsMajorAttention(nn.Module):
  """MultiHeadDotProductAttention's parameters ([W, H, D] query/key/value kernels, [H, D, W]
  out), with the attention computed heads-major: q, k, v as [B, H, T, D]."""

  num_heads: int

  @nn.compact
  def __call__(self, x):
    h, d = self.num_heads, x.shape[-1] // self.num_heads
    init = nn.initializers.xavier_uniform()

    def proj(name):
      kernel = self.param(f"{name}_kernel", init, (x.shape[-1], h, d))
      bias = self.param(f"{name}_bias", nn.initializers.zeros, (h, d))
      return jnp.einsum("btw,whd->bhtd", x, kernel) + bias[:, None, :]

    q, k, v = proj("query") / jnp.sqrt(d).astype(x.dtype), proj("key"), proj("value")
    o = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2), axis=-1) @ v
    out = self.param("out_kernel", init, (h, d, x.shape[-1]))
    return jnp.einsum("bhtd,hdw->btw", o, out) + self.param(
      "out_bias", nn.initializers.zeros, (x.shape[-1],)
    )


def _dpa(query, key, value, **_):
  return jax.nn.dot_product_attention(query, key, value)


def _heads_major_params(flax_params):
  """MultiHeadDotProductAttention's parameters renamed for HeadsMajorAttention (same values)."""
  return {
    f"{name}_{kind}": flax_params[name][kind]
    for name in ("query", "key", "value", "out")
    for kind in ("kernel", "bias")
  }


def variants(batch: int, image: int):
  """{group: {name: (fwd+bwd fn, params, output fn)}}, with shared inputs and parameters."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, image, image, 3)), jnp.float32)
  tokens = jnp.asarray(rng.normal(size=(batch, (image // PATCH) ** 2, WIDTH)), jnp.float32)

  def entry(module, params, x):
    apply = lambda p: module.apply({"params": p}, x)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))
    return grad, params, jax.jit(apply)

  conv = nn.Conv(WIDTH, (PATCH, PATCH), strides=(PATCH, PATCH), padding="VALID")
  p_embed = conv.init(jax.random.PRNGKey(0), images[:1])["params"]
  mha = lambda **kw: nn.MultiHeadDotProductAttention(
    num_heads=HEADS, kernel_init=nn.initializers.xavier_uniform(), deterministic=True, **kw
  )
  p_attn = mha().init(jax.random.PRNGKey(0), tokens[:1])["params"]
  return {
    "patch embedding": {
      "nn.Conv (strided)": entry(conv, p_embed, images),
      "PatchEmbedding (patchify + matmul)": entry(PatchEmbedding(PATCH, WIDTH), p_embed, images),
    },
    "attention block": {
      "flax MultiHeadDotProductAttention": entry(mha(), p_attn, tokens),
      "jax.nn.dot_product_attention": entry(mha(attention_fn=_dpa), p_attn, tokens),
      "heads-major batched matmuls": entry(
        HeadsMajorAttention(HEADS), _heads_major_params(p_attn), tokens
      ),
    },
  }


def profile_vit(batch: int, image: int, steps: int = 3) -> list[tuple[str, float]]:
  """Op time per kind (ms per fwd+bwd) in a profiler trace of ViT-S/32's fwd+bwd."""
  model = models.build_model("vit_s32", num_classes=1000)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, image, image, 3)), jnp.float32)
  y = jnp.arange(batch) % 1000
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])

  def loss(p):
    logits = model.apply(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  grad = jax.jit(jax.grad(loss))
  jax.block_until_ready(grad(params))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(steps):
      jax.block_until_ready(grad(params))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  kinds = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or not re.match(r"^[a-z_]+(\.\d+)?$", name):
      continue  # runtime and Python spans; keep the compiled program's ops
    kinds[re.sub(r"\.\d+$", "", name)] += e.get("dur", 0) / 1e3 / steps
  return kinds.most_common()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--image", type=int, default=224)
  p.add_argument("--rounds", type=int, default=15)
  p.add_argument("--profile", action="store_true", help="also profile ViT-S/32 fwd+bwd by op kind")
  args = p.parse_args(argv)
  results = {}
  for group, entries in variants(args.batch, args.image).items():
    (ref_name, (_, ref_params, ref_out)), *_ = entries.items()
    want = ref_out(ref_params)
    fns = {}
    for name, (grad, params, out) in entries.items():
      np.testing.assert_allclose(out(params), want, rtol=1e-4, atol=1e-4)
      jax.block_until_ready(grad(params))  # compile
      fns[name] = lambda g=grad, q=params: jax.block_until_ready(g(q))
    times = {k: v["median_s"] for k, v in peer.interleaved(fns, args.rounds).items()}
    print(f"\n{group}, fwd+bwd, batch {args.batch}, {args.image} px, median of {args.rounds}:")
    for name, t in times.items():
      print(f"  {name:40s} {1e3 * t:8.2f} ms  {t / times[ref_name]:.2f}x")
    results[group] = times
  if args.profile:
    rows = profile_vit(args.batch, args.image)
    total = sum(ms for _, ms in rows)
    print(f"\nViT-S/32 fwd+bwd op time by kind (sum over threads {total:.0f} ms):")
    for kind, ms in rows[:12]:
      print(f"  {kind:28s} {ms:8.1f} ms  {ms / total:5.1%}")
    results["profile"] = rows
  return results


if __name__ == "__main__":
  main()
