"""pf_jax's SAM-family steps against their floor and their peers, in one process.

  python -m benchmarks.peer --model vit_s32 --image 224 --batch 32 --m 8 --rounds 5
  python -m benchmarks.peer --model resnet50 --image 112 --batch 16 --m 4 --rounds 5

Times, on the same architecture, batch and m, with interleaved rounds (every variant once per
round, round after round; the median over rounds is reported, so a slow spell of a shared
machine hits all variants alike):

- the floor pieces: fwd+bwd on the whole per-device batch and the optimizer update (clipping +
  AdamW); floor = 2 x fwd+bwd + update, what any SAM-family step needs at least;
- the base step (one fwd+bwd + update);
- pf_jax's SAM / OBF-SAM / GSAM / ASAM / random steps with one chunk (m = batch), and OBF-SAM
  and SAM with m-chunks (each --m < batch) in every chunk strategy of pf_jax.sam_family;
- `optax.contrib.sam` (plain SAM, opaque mode, one adversarial step);
- the PyTorch peer (benchmarks/torch_sam.py, a sequential chunk loop; when torch is installed,
  `pip install -e .[bench]`) on timm models with the same parameter counts (asserted).

It also reports the compiled memory of each chunk strategy (`memory_analysis()`), writes
results/<device>/<model>_<image>px_b<batch>_<dtype>.json with a Markdown table beside it (.md),
and prints the table. Absolute times on a shared machine are inflated; ratios from the same
run are what to compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pf_jax
from pf_jax import models
from pf_jax import sam_family

# pf_jax model name -> (timm name, timm kwargs) with the same parameter count.
TORCH_MODELS = {
  "vit_s32": ("vit_small_patch32_224", dict(class_token=False, global_pool="avg")),
  "vit_s16": ("vit_small_patch16_224", dict(class_token=False, global_pool="avg")),
  "resnet50": ("resnet50", {}),
  "resnet101": ("resnet101", {}),
}
RHO, GSAM_XI, ASAM_ETA = 0.05, 0.4, 0.01


@dataclasses.dataclass(frozen=True)
class Variant:
  """One SAM-family step: its pf_jax spec and the torch peer's equivalent."""

  name: str
  objective: str  # "steepest", "obf" or "random"
  m: int
  chunk_mode: str | None = None
  gsam_alpha: float = 0.0
  asam: str | None = None

  def spec(self, spec_class, obf, **fields):
    """This step as `spec_class`: pf_jax.SamSpec or the torch peer's torch_sam.Spec (the same
    field names); `obf()` is that library's OBF objective (lambda = 1/C, gamma = 1)."""
    return spec_class(
      rho=RHO,
      objective=obf() if self.objective == "obf" else self.objective,
      m=self.m,
      gsam_alpha=self.gsam_alpha,
      asam=self.asam,
      asam_eta=ASAM_ETA if self.asam else 0.0,
      **fields,
    )


def variants(batch: int, ms, chunk_modes) -> list[Variant]:
  out = [
    Variant(f"SAM m={batch}", "steepest", batch),
    Variant(f"OBF-SAM m={batch}", "obf", batch),
    Variant(f"GSAM m={batch}", "steepest", batch, gsam_alpha=GSAM_XI),
    Variant(f"ASAM m={batch}", "steepest", batch, asam="both"),
    Variant(f"random m={batch}", "random", batch),
  ]
  for m in ms:
    if m < batch:
      for mode in chunk_modes:
        out.append(Variant(f"OBF-SAM m={m} {mode}", "obf", m, chunk_mode=mode))
        out.append(Variant(f"SAM m={m} {mode}", "steepest", m, chunk_mode=mode))
  return out


# ---------------------------------------------------------------------------------------------
# pf_jax side


def pf_jax_spec(variant: Variant, num_classes: int) -> pf_jax.SamSpec:
  obf = lambda: pf_jax.obf(1.0 / num_classes, 1.0, "softmax")
  chunks = dict(chunk_mode=variant.chunk_mode) if variant.chunk_mode else {}
  return variant.spec(pf_jax.SamSpec, obf, **chunks)


def pf_jax_gradient(forward, loss_fn, variant: Variant, num_classes: int, has_aux: bool):
  """The one place that calls pf_jax's SAM API: (params, batch, step, rng) -> (grads, aux).

  `forward(params, batch)` returns logits (or (logits, aux) with has_aux); `loss_fn(logits,
  batch)` the task loss.
  """
  spec = pf_jax_spec(variant, num_classes)
  fn = pf_jax.sam_value_and_grad(forward, loss_fn, spec, has_aux=has_aux)

  def grad_fn(params, batch, step, rng):
    (_, aux, _), grads = fn(params, batch, step=step, rng=rng)
    return grads, aux

  return grad_fn


class JaxBench:
  """Jitted pf_jax pieces on one model and batch; every callable returns device arrays."""

  def __init__(self, model_name, image, batch, num_classes, dtype):
    self.num_classes = num_classes
    self.model = models.build_model(model_name, num_classes=num_classes, dtype=dtype)
    self.has_bn = models.has_batch_norm(model_name)
    rng = np.random.default_rng(0)
    self.batch = {
      "image": jnp.asarray(rng.normal(size=(batch, image, image, 3)), dtype),
      "label": jnp.asarray(rng.integers(0, num_classes, size=batch), jnp.int32),
    }
    variables = jax.jit(
      lambda: self.model.init(jax.random.PRNGKey(0), self.batch["image"][:1], train=False)
    )()
    # A random head (pf_jax zero-inits it): gradients and OBF probabilities are then generic.
    params = dict(variables["params"])
    head = dict(params["head"])
    head["kernel"] = 0.01 * jax.random.normal(jax.random.PRNGKey(1), head["kernel"].shape)
    params["head"] = head
    self.params = params
    self.stats = variables.get("batch_stats", {})
    self.num_params = sum(x.size for x in jax.tree.leaves(self.params))
    self.tx = optax.chain(optax.clip_by_global_norm(1.0), pf_jax.adamw(1e-3, weight_decay=0.05))
    self.opt_state = jax.jit(self.tx.init)(self.params)
    self.loss_fn = pf_jax.softmax_cross_entropy  # (logits, batch)

  def forward(self, stats):
    """forward(params, batch) with this step's BatchNorm statistics (aux: the new ones)."""
    model = self.model
    if not self.has_bn:
      return lambda p, batch: model.apply({"params": p}, batch["image"], train=True)

    def forward(p, batch):
      logits, new = model.apply(
        {"params": p, "batch_stats": stats}, batch["image"], train=True, mutable=["batch_stats"]
      )
      return logits, new["batch_stats"]

    return forward

  def _loss(self, stats):
    forward = self.forward(stats)

    def loss(p, batch):
      out = forward(p, batch)
      logits, aux = out if self.has_bn else (out, None)
      return self.loss_fn(logits, batch), aux

    return loss

  def _update(self, grads, opt_state, params):
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def args(self):
    return (self.params, self.stats, self.opt_state, self.batch, jnp.zeros((), jnp.int32))

  def fwdbwd(self):
    def f(params, stats, opt_state, batch, step):
      (_, aux), grads = jax.value_and_grad(self._loss(stats), has_aux=True)(params, batch)
      return grads, aux

    return f

  def update(self):
    """The update alone, on a given gradient (an argument, not a constant folded into it)."""
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), self.params)

    def f(params, grads, opt_state):
      return self._update(grads, opt_state, params)

    return f, (self.params, grads, self.opt_state)

  def base_step(self):
    def f(params, stats, opt_state, batch, step):
      (_, aux), grads = jax.value_and_grad(self._loss(stats), has_aux=True)(params, batch)
      return self._update(grads, opt_state, params), aux

    return f

  def sam_step(self, variant: Variant):
    def f(params, stats, opt_state, batch, step):
      grad_fn = pf_jax_gradient(
        self.forward(stats), self.loss_fn, variant, self.num_classes, self.has_bn
      )
      grads, aux = grad_fn(params, batch, step, jax.random.fold_in(jax.random.PRNGKey(0), step))
      return self._update(grads, opt_state, params), aux

    return f

  def pf_jax_sam_tx(self, variant: Variant):
    """pf_jax.sam(base, spec, loss_fn) as an optax transformation, fed the caller's gradient (which
    steepest SAM with one chunk reuses as its ascent direction)."""
    spec = pf_jax_spec(variant, self.num_classes)
    tx = pf_jax.sam(self.tx, spec, self.loss_fn, has_aux=self.has_bn)
    state = jax.jit(tx.init)(self.params)

    def f(params, stats, state, batch, step):
      grads, aux = jax.grad(self._loss(stats), has_aux=True)(params, batch)
      updates, new_state = tx.update(grads, state, params, forward=self.forward(stats), batch=batch)
      return (optax.apply_updates(params, updates), new_state), aux

    return f, (self.params, self.stats, state) + self.args()[3:]

  def optax_sam(self):
    """optax.contrib.sam: normalized ascent of radius RHO, then the base optimizer."""
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
    tx = optax.contrib.sam(self.tx, adv, sync_period=2, opaque_mode=True)
    state = jax.jit(tx.init)(self.params)

    def f(params, stats, state, batch, step):
      loss = self._loss(stats)
      grads, aux = jax.grad(loss, has_aux=True)(params, batch)
      grad_fn = lambda p, _: jax.grad(loss, has_aux=True)(p, batch)[0]
      updates, new_state = tx.update(grads, state, params, grad_fn=grad_fn)
      return (optax.apply_updates(params, updates), new_state), aux

    return f, (self.params, self.stats, state) + self.args()[3:]


def compiled(fn, args):
  """(jitted callable that blocks, compiled memory analysis as a dict of bytes)."""
  exe = jax.jit(fn).lower(*args).compile()
  mem = {}
  try:
    analysis = exe.memory_analysis()
    for key in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
      mem[key] = int(getattr(analysis, key, 0) or 0)
  except Exception:  # some backends do not report it
    pass
  return (lambda: jax.block_until_ready(exe(*args))), mem


# ---------------------------------------------------------------------------------------------
# torch side


class TorchBench:
  """The PyTorch peer on a timm model with pf_jax's parameter count (asserted)."""

  def __init__(self, model_name, image, batch, num_classes, dtype, expected_params, threads):
    import timm
    import torch

    from benchmarks import torch_sam

    self.torch, self.torch_sam = torch, torch_sam
    torch.set_num_threads(threads)
    timm_name, kw = TORCH_MODELS[model_name]
    if timm_name.startswith("vit"):
      kw = dict(kw, img_size=image)
    torch.manual_seed(0)
    self.model = timm.create_model(timm_name, num_classes=num_classes, **kw)
    self.num_params = sum(p.numel() for p in self.model.parameters())
    if self.num_params != expected_params:
      raise AssertionError(
        f"timm {timm_name} has {self.num_params} parameters, pf_jax {expected_params}"
      )
    self.model.train()
    self.autocast = dtype == "bfloat16"
    self.num_classes = num_classes
    self.x = torch.randn(batch, 3, image, image)
    self.y = torch.randint(0, num_classes, (batch,))
    self.opt = torch_sam.adamw(self.model, lr=1e-3, weight_decay=0.05)
    self.loss_fn = torch_sam.softmax_xent

  def _ctx(self):
    return self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.autocast)

  def fwdbwd(self):
    def f():
      with self._ctx():
        self.model.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.x).float(), self.y).backward()

    return f

  def update(self):
    grads = [1e-3 * self.torch.ones_like(p) for p in self.model.parameters()]
    return lambda: self.torch_sam.apply_update(self.model, self.opt, grads)

  def base_step(self):
    def f():
      with self._ctx():
        self.torch_sam.base_step(self.model, self.opt, self._loss, self.x, self.y)

    return f

  def _loss(self, logits, labels):
    return self.loss_fn(logits.float(), labels)

  def sam_step(self, variant: Variant):
    ts = self.torch_sam
    spec = variant.spec(ts.Spec, lambda: ts.Obf(1.0 / self.num_classes))

    def f():
      with self._ctx():
        ts.sam_step(self.model, self.opt, self._loss, self.x, self.y, spec)

    return f


# ---------------------------------------------------------------------------------------------
# timing and reporting


def interleaved(fns: dict, rounds: int) -> dict:
  """Median seconds per call over `rounds` rounds; each round calls every fn once, in turn.

  Odd rounds go in reverse order, so no step always runs right after the same neighbour (a
  torch step right after a long stretch of XLA work ran up to 4x slower in the first tries).
  """
  samples = {k: [] for k in fns}
  for r in range(rounds):
    for name, fn in list(fns.items())[:: -1 if r % 2 else 1]:
      t0 = time.perf_counter()
      fn()
      samples[name].append(time.perf_counter() - t0)
  return {
    k: dict(median_s=statistics.median(v), min_s=min(v), samples_s=v) for k, v in samples.items()
  }


def device_name() -> str:
  d = jax.devices()[0]
  kind = d.platform if d.platform == "cpu" else d.device_kind
  return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")


def torch_available() -> bool:
  try:
    import timm  # noqa: F401
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def run(args) -> dict:
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  jb = JaxBench(args.model, args.image, args.batch, args.num_classes, dtype)
  chunk_modes = tuple(args.chunk_modes or sam_family.CHUNK_MODES)
  vs = vs_all = variants(args.batch, args.m, chunk_modes)
  if args.only:
    vs = [v for v in vs if re.search(args.only, v.name)]
  jargs = jb.args()
  jax_fns, memory = {}, {}
  pieces = {"fwd+bwd": (jb.fwdbwd(), jargs), "update": jb.update()}
  pieces["base step"] = (jb.base_step(), jargs)
  for v in vs:
    pieces[v.name] = (jb.sam_step(v), jargs)
  if not args.no_optax:
    pieces[f"pf_jax.sam tx m={args.batch}"] = jb.pf_jax_sam_tx(vs_all[0])
    pieces[f"optax.contrib.sam m={args.batch}"] = jb.optax_sam()
  compile_s = {}
  for name, (fn, fargs) in pieces.items():
    t0 = time.perf_counter()
    jax_fns[name], memory[name] = compiled(fn, fargs)
    jax_fns[name]()  # warm up
    compile_s[name] = time.perf_counter() - t0
    print(f"  compiled {name} ({compile_s[name]:.1f} s)", file=sys.stderr)

  torch_fns = {}
  use_torch = not args.no_torch and args.model in TORCH_MODELS and torch_available()
  if use_torch:
    tb = TorchBench(
      args.model, args.image, args.batch, args.num_classes, args.dtype, jb.num_params, args.threads
    )
    torch_fns = {"fwd+bwd": tb.fwdbwd(), "update": tb.update(), "base step": tb.base_step()}
    for v in vs:
      if v.chunk_mode in (None, chunk_modes[0]):  # the torch loop has one strategy: sequential
        torch_fns[re.sub(r" \w+$", "", v.name) if v.chunk_mode else v.name] = tb.sam_step(v)
    for fn in torch_fns.values():
      fn()  # warm up

  fns = {("pf_jax", k): f for k, f in jax_fns.items()}
  fns.update({("torch", k): f for k, f in torch_fns.items()})
  timed = interleaved(fns, args.rounds)
  jax_t = {k: timed["pf_jax", k] for k in jax_fns}
  torch_t = {k: timed["torch", k] for k in torch_fns}
  floor = 2 * jax_t["fwd+bwd"]["median_s"] + jax_t["update"]["median_s"]
  result = dict(
    config=dict(
      model=args.model,
      image=args.image,
      batch=args.batch,
      m=list(args.m),
      dtype=args.dtype,
      rounds=args.rounds,
      num_classes=args.num_classes,
      chunk_modes=list(chunk_modes),
      rho=RHO,
      gsam_xi=GSAM_XI,
      asam="both",
      asam_eta=ASAM_ETA,
      obf=f"lambda=1/{args.num_classes}, gamma=1",
    ),
    machine=dict(
      device=device_name(),
      jax_backend=jax.default_backend(),
      jax=jax.__version__,
      optax=optax.__version__,
      cpu_count=os.cpu_count(),
      platform=platform.platform(),
      torch=__import__("torch").__version__ if use_torch else None,
      torch_threads=args.threads if use_torch else None,
    ),
    num_params=jb.num_params,
    floor_s=floor,
    pf_jax=jax_t,
    torch=torch_t,
    memory=memory,
    compile_s=compile_s,
  )
  if use_torch:
    result["torch"]["floor_s"] = 2 * torch_t["fwd+bwd"]["median_s"] + torch_t["update"]["median_s"]
  return result


def _peer_name(name: str) -> str:
  """The torch row of a pf_jax row: the chunk strategy dropped (torch has one)."""
  return re.sub(r"(m=\d+) \w+$", r"\1", name)


def table(result: dict, stat: str = "median_s") -> str:
  """The Markdown table of one run: `stat` median_s (the median of the rounds) or min_s (the
  best round, a steadier estimate when other jobs share the machine)."""
  c = result["config"]
  floor = 2 * result["pf_jax"]["fwd+bwd"][stat] + result["pf_jax"]["update"][stat]
  jt, tt = result["pf_jax"], {k: v for k, v in result["torch"].items() if k != "floor_s"}
  optax_row = next((k for k in jt if k.startswith("optax.contrib.sam")), None)
  optax_s = jt[optax_row][stat] if optax_row else None
  lines = [
    f"{c['model']} {c['image']}px, batch {c['batch']}, {c['dtype']}, "
    f"{'median' if stat == 'median_s' else 'best'} of {c['rounds']} "
    f"interleaved rounds on {result['machine']['device']} ({result['machine']['cpu_count']} "
    f"CPUs); floor = 2 x fwd+bwd + update = {1e3 * floor:.1f} ms",
    "",
    "| step | pf_jax ms | pf_jax / floor | torch ms | torch / pf_jax (speed-up) | pf_jax / optax.contrib.sam |",
    "|---|---|---|---|---|---|",
  ]
  for name, t in jt.items():
    ms = 1e3 * t[stat]
    peer = tt.get(_peer_name(name))
    peer_ms = f"{1e3 * peer[stat]:.1f}" if peer else "-"
    speed = f"{peer[stat] / t[stat]:.2f}" if peer else "-"
    vs_optax = (
      f"{t[stat] / optax_s:.2f}"
      if optax_s and name in (f"SAM m={c['batch']}", f"pf_jax.sam tx m={c['batch']}", optax_row)
      else "-"
    )
    lines.append(
      f"| {name} | {ms:.1f} | {t[stat] / floor:.2f} | {peer_ms} | {speed} | {vs_optax} |"
    )
  if "floor_s" in result["torch"]:
    tf = 2 * tt["fwd+bwd"][stat] + tt["update"][stat]
    lines.append(
      f"| floor (2 x fwd+bwd + update) | {1e3 * floor:.1f} | 1.00 | {1e3 * tf:.1f} | "
      f"{tf / floor:.2f} | - |"
    )
  mem = {k: v for k, v in result["memory"].items() if v and " m=" in k}
  if mem and stat == "median_s":
    lines += [
      "",
      "Compiled memory (`memory_analysis()`, MiB):",
      "",
      "| step | temp | arguments | outputs |",
      "|---|---|---|---|",
    ]
    mib = lambda b: f"{b / 2**20:.1f}"
    for k, v in mem.items():
      lines.append(
        f"| {k} | {mib(v.get('temp_size_in_bytes', 0))} | "
        f"{mib(v.get('argument_size_in_bytes', 0))} | {mib(v.get('output_size_in_bytes', 0))} |"
      )
  return "\n".join(lines) + "\n"


def report(result: dict) -> str:
  """Median table (with memory), then the same with the best round of each step."""
  return table(result) + "\n" + table(result, "min_s")


def write(result: dict, out_dir: str) -> tuple[str, str]:
  c = result["config"]
  d = os.path.join(out_dir, result["machine"]["device"])
  os.makedirs(d, exist_ok=True)
  ms = "-".join(str(m) for m in c["m"])
  stem = os.path.join(d, f"{c['model']}_{c['image']}px_b{c['batch']}_m{ms}_{c['dtype']}")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(report(result))
  return stem + ".json", stem + ".md"


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="vit_s32", help="a pf_jax.models name")
  p.add_argument("--image", type=int, default=None, help="side in pixels (CPU: 224 ViT, 112 CNN)")
  p.add_argument("--batch", type=int, default=None, help="per-device batch (CPU 32/16, GPU 256)")
  p.add_argument("--m", type=int, nargs="*", default=None, help="chunk sizes below the batch")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--chunk-modes", nargs="*", default=None, help="default: all of CHUNK_MODES")
  p.add_argument("--only", default=None, help="regex: time only the SAM variants it matches")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-optax", action="store_true")
  p.add_argument("--out", default="results")
  p.add_argument("--render", default=None, help="a saved .json: rewrite its .md, print it")
  args = p.parse_args(argv)
  gpu = jax.default_backend() != "cpu"
  cnn = not args.model.startswith("vit")
  if args.image is None:
    args.image = 224 if gpu or not cnn else 112
  if args.batch is None:
    args.batch = 256 if gpu else (16 if cnn else 32)
  if args.m is None:
    args.m = [64] if gpu else [args.batch // 4]
  return args


def main(argv=None) -> dict:
  args = parse(argv)
  if args.render:  # re-render the tables of a saved run
    with open(args.render) as f:
      result = json.load(f)
    for side in ("pf_jax", "torch"):
      for v in result[side].values():
        if isinstance(v, dict):
          v.setdefault("min_s", min(v["samples_s"]))
    args.out = os.path.dirname(os.path.dirname(args.render))
  else:
    result = run(args)
  json_path, md_path = write(result, args.out)
  print(report(result))
  print(f"wrote {json_path} and {md_path}")
  return result


if __name__ == "__main__":
  main()
