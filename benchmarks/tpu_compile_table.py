"""Every paper run compiled for its TPU slice on this machine: results/tpu_compile.json and the
tables of docs/benchmarks.md ("Compiled for TPU").

  python benchmarks/tpu_compile_table.py            # compile every missing row, one at a time
  python benchmarks/tpu_compile_table.py --markdown # rewrite the tables in docs/benchmarks.md
  python benchmarks/tpu_compile_table.py --shard=1/2 # every second row from the second (two workers)
  python benchmarks/tpu_compile_table.py --cpu_budget_min=60  # record longer compiles as unfinished

Restartable: each row is compiled in its own process (`--one=KEY`) and appended to the JSON as it
finishes; rows already there are skipped. Needs libtpu (pip install -e ".[tpu]"). A full ViT or
ResNet train step takes about 10 minutes to compile on a busy 2-core machine.

Two kinds of rows:
  - "run": a paper config and method (`pf_jax.tpu_compile.compile_programs`, the train step).
  - "chunks": the chunk strategies (unroll / scan / vmap) of one SAM step at a given m, on a ViT-S/32
    of reduced depth (so that all of them compile in minutes here).
"""

import argparse
import functools
import glob
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
RESULTS = os.path.join(REPO_ROOT, "results", "tpu_compile.json")
DOCS = os.path.join(REPO_ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- tpu-compile-table: begin -->", "<!-- tpu-compile-table: end -->"
LINES_BEGIN, LINES_END = "<!-- tpu-command-lines: begin -->", "<!-- tpu-command-lines: end -->"
CHUNK_BEGIN, CHUNK_END = "<!-- tpu-chunk-table: begin -->", "<!-- tpu-chunk-table: end -->"

SLICES = ("v4-8", "v5litepod-8")  # a v4-8 host; a one-host v5e slice of 8 chips
DTYPES = ("float32", "bfloat16")
# Method classes -> each config's method name.
CLASSES = ("none", "SAM", "OBF-SAM", "GSAM", "ASAM")
IMAGENET = {
  "none": "adamw",
  "SAM": "sam_steep",
  "OBF-SAM": "sam_obf",
  "GSAM": "gsam_steep",
  "ASAM": "asam_steep",
}
CONFIGS = {  # config -> {class: its argument}
  "configs/vit_s32_imagenet.py": dict(IMAGENET),
  "configs/vit_s16_imagenet.py": dict(IMAGENET),
  "configs/resnet50_imagenet.py": dict(IMAGENET, none="sgd"),
  "configs/resnet101_imagenet.py": dict(IMAGENET, none="sgd"),
  "configs/cifar_finetune.py": {
    k: f"vit_s32,cifar10,{v}" for k, v in dict(IMAGENET, none="none").items() if k in CLASSES[:3]
  },
  # Section 6.1's pool: SAM and OBF-SAM at the smallest, the paper's and the largest m.
  "configs/cifar10_msweep.py": {"SAM": "steep,64", "OBF-SAM": "obf,64", "OBF-SAM m=1": "obf,1"},
}
# Also compiled with its other programs: the lines of README's command.
HEADLINE = "run|configs/vit_s32_imagenet.py:sam_obf|OBF-SAM|v4-8|float32"
# Chunk strategies: ViT-S/32 of this depth, 512 images per chip on a v4-8 (global batch 2048).
CHUNK_DEPTH = 2
CHUNK_CASES = [(64, mode) for mode in ("unroll", "scan", "vmap")]
CHUNK_CASES += [(8, mode) for mode in ("unroll", "scan", "vmap")]
CHUNK_CASES += [(1, mode) for mode in ("scan", "vmap")]


def fix_method_names():
  """Each config's real method names (cifar_finetune's 'none' row is called 'none' there)."""
  from pf_jax import cli  # pylint: disable=g-import-not-at-top

  for config, rows in CONFIGS.items():
    for cls, arg in list(rows.items()):
      try:
        cli.build_config(f"{config}:{arg}", [])
      except Exception:  # pylint: disable=broad-except
        rows.pop(cls)


def rows():
  """Every row's key, in the order they are compiled: the chunk comparison interleaved with the
  most asked-for runs (this machine compiles a handful of full programs an hour)."""
  first = [
    "chunks|64|unroll",
    "chunks|64|scan",
    "chunks|8|scan",
    "chunks|64|vmap",
    HEADLINE,
    "chunks|8|vmap",
    "run|configs/vit_s32_imagenet.py:adamw|none|v4-8|float32",
    "run|configs/vit_s32_imagenet.py:sam_obf|OBF-SAM|v5litepod-8|bfloat16",
  ]
  out = list(first)
  last = "chunks|8|unroll"  # 64 unrolled chunks: the slowest chunk row to compile
  out += [f"chunks|{m}|{mode}" for m, mode in CHUNK_CASES if f"chunks|{m}|{mode}" not in first]
  out.remove(last)
  # The v4-8 in float32 first, then the v5e in bfloat16 (its usual precision), then the others.
  for slice_name, dtype in zip(SLICES * 2, DTYPES + DTYPES[::-1]):
    for cls in ("OBF-SAM", "none", "SAM", "GSAM", "ASAM", "OBF-SAM m=1"):
      for config, methods in CONFIGS.items():
        key = f"run|{config}:{methods.get(cls)}|{cls}|{slice_name}|{dtype}"
        if cls in methods and key not in out:
          out.append(key)
  return out + [last]


def load() -> dict:
  if not os.path.exists(RESULTS):
    return {}
  with open(RESULTS) as f:
    return json.load(f)


def save(key: str, row: dict) -> None:
  """Adds one row; a lock file lets several shards (--shard) append to the same JSON."""
  import fcntl  # pylint: disable=g-import-not-at-top

  with open(RESULTS + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    data = load()
    data[key] = row
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
      json.dump(data, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, RESULTS)


def compile_one(key: str) -> dict:
  """Compiles one row (in this process) and returns its record."""
  import jax  # pylint: disable=g-import-not-at-top

  from pf_jax import cli  # pylint: disable=g-import-not-at-top
  from pf_jax import config_validation  # pylint: disable=g-import-not-at-top
  from pf_jax import models  # pylint: disable=g-import-not-at-top
  from pf_jax import sam_family  # pylint: disable=g-import-not-at-top
  from pf_jax import tpu_compile  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  kind, *parts = key.split("|")
  if kind == "chunks":
    m, mode = int(parts[0]), parts[1]
    name = f"vit_s32_depth{CHUNK_DEPTH}"
    models.MODELS[name] = functools.partial(
      models.MODELS["vit_s32"].func, **dict(models.MODELS["vit_s32"].keywords, depth=CHUNK_DEPTH)
    )
    c = cli.build_config("configs/vit_s32_imagenet.py:sam_obf", [])
    c.model, c.global_batch_size, c.sam.m, c.sam.chunk_mode = name, 2048, m, mode
    slice_name, dtype = "v4-8", "float32"
  else:
    spec, cls, slice_name, dtype = parts
    c = cli.build_config(spec, [])
    c.mixed_precision = dtype == "bfloat16"
  s = tpu_compile.parse_slice(slice_name)
  record = dict(slice=slice_name, dtype=dtype, devices=s.devices, hbm_gib=s.hbm_gib)
  try:
    config_validation.validate(c, s.devices, s.hosts)
  except ValueError as e:
    return dict(record, error=str(e))
  with tpu_compile.quiet_libtpu():
    devices = tpu_compile.topology_devices(s)
    start, cpu_start = time.time(), time.process_time()
    if key == HEADLINE:  # every program the command compiles (compile_programs' default)
      reports = tpu_compile.compile_programs(c, s, devices)
    else:
      reports = tpu_compile.compile_programs(c, s, devices, ("train",))
  r = reports[0]
  if key == HEADLINE:  # the command's own lines (main.py --check_only --compile_for)
    record["lines"] = [tpu_compile.describe_slice(c, s)] + [
      tpu_compile.format_line(x, s) for x in reports
    ]
  exp = tpu_compile.build_experiment(c, s)
  n_chunks = None
  if exp.spec is not None:
    n_chunks, _ = sam_family.chunking(exp.spec.m, exp.per_device_batch, exp.num_devices)
  return dict(
    record,
    per_device_batch=exp.per_device_batch,
    chunks_per_device=n_chunks,
    strategy=None
    if exp.spec is None
    else sam_family.chunk_strategy(c.sam.chunk_mode, n_chunks, "tpu"),
    argument_gib=r.argument_bytes / tpu_compile.GIB,
    temp_gib=r.temp_bytes / tpu_compile.GIB,
    output_gib=r.output_bytes / tpu_compile.GIB,
    alias_gib=r.alias_bytes / tpu_compile.GIB,
    total_gib=r.total_bytes / tpu_compile.GIB,
    fits=r.fits(s),
    tflop=r.step_flops / 1e12,
    xla_tflop=r.flops / 1e12,
    matmul_tflop=r.matmul_flops / 1e12,
    bound_ms=r.bound_ms(s),
    steps=r.calls,
    days=r.calls * r.bound_ms(s) / 1e3 / 86400,
    compile_s=r.compile_seconds,
    wall_s=time.time() - start,
    # CPU seconds of all this process's threads: unlike wall time, not inflated by other load.
    cpu_s=time.process_time() - cpu_start,
    jax=jax.__version__,
  )


def compiling(key: str) -> bool:
  """Whether another process is compiling `key` now (a worker restarted beside its last row)."""
  arg = f"--one={key}".encode()
  for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
    try:
      with open(cmdline, "rb") as f:
        if arg in f.read().split(b"\0"):
          return True
    except OSError:  # the process ended meanwhile
      continue
  return False


def run_all(shard: int = 0, shards: int = 1, cpu_budget_min: float = 0) -> None:
  """Compiles the missing rows of this shard, each in its own process. With a budget, a compile
  that uses more CPU time is stopped (RLIMIT_CPU) and recorded as unfinished: a lower bound."""
  import resource  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top

  budget_s = int(cpu_budget_min * 60)
  limit = lambda: resource.setrlimit(resource.RLIMIT_CPU, (budget_s, budget_s + 10))  # noqa: E731
  fix_method_names()
  for key in rows()[shard::shards]:
    if key in load() or compiling(key):
      continue
    print(time.strftime("%H:%M:%S"), "compiling", key, flush=True)
    out = subprocess.run(
      [sys.executable, __file__, f"--one={key}"],
      capture_output=True,
      text=True,
      cwd=REPO_ROOT,
      preexec_fn=limit if budget_s else None,
    )
    if budget_s and out.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
      print(f"stopped after its CPU budget of {cpu_budget_min:g} min", flush=True)
      save(key, {"unfinished_cpu_s": budget_s})
    elif out.returncode:
      print(out.stderr[-2000:], flush=True)
      save(key, {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]})
    else:
      print(out.stdout.strip().splitlines()[-1], flush=True)


def compile_time(r: dict, unit: str) -> str:
  """A row's compile time in `unit` ("min" or "s"): the CPU budget it ran out of, else its CPU
  time, else (rows from before cpu_s was recorded) wall time."""
  seconds_per_unit, digits = {"min": (60, 1), "s": (1, 0)}[unit]
  if "unfinished_cpu_s" in r:
    return f"not finished in {r['unfinished_cpu_s'] / seconds_per_unit:.{digits}f} CPU-{unit}"
  if "cpu_s" in r:
    return f"{r['cpu_s'] / seconds_per_unit:.{digits}f} CPU-{unit}"
  return f"{r['compile_s'] / seconds_per_unit:.{digits}f} {unit}"


def markdown() -> tuple[str, str]:
  """(the run table, the chunk table) in markdown, from the JSON."""
  fix_method_names()
  data = load()
  lines = [
    "| config : method | class | slice | dtype | fits | GiB/chip (args + temp + out - donated) | "
    "TFLOP/chip/step | ms/step bound | steps | days bound | compile here |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  missing = []
  for key in rows():
    if not key.startswith("run|"):
      continue
    _, spec, cls, slice_name, dtype = key.split("|")
    r = data.get(key)
    if r is None:
      missing.append(key)
      continue
    name = spec.replace("configs/", "")
    if "error" in r:
      lines.append(f"| {name} | {cls} | {slice_name} | {dtype} | error: {r['error']} ||||||")
      continue
    if "unfinished_cpu_s" in r:
      cells = [name, cls, slice_name, dtype, "not known"] + [""] * 5 + [compile_time(r, "min")]
      lines.append("| " + " | ".join(cells) + " |")
      continue
    parts = (
      "XLA refused it: out of HBM, no breakdown"
      if not r["argument_gib"] and not r["temp_gib"]
      else f"{r['argument_gib']:.2f} + {r['temp_gib']:.2f} + "
      f"{r['output_gib']:.2f} - {r['alias_gib']:.2f}"
    )
    lines.append(
      f"| {name} | {cls} | {slice_name} | {dtype} | {'yes' if r['fits'] else '**no**'} | "
      f"{r['total_gib']:.2f} ({parts}) of {r['hbm_gib']:g} | {r['tflop']:.2f} | "
      f"{r['bound_ms']:.1f} | "
      f"{r['steps']} | {r['days']:.3f} | " + compile_time(r, "min") + " |"
    )
  lines.append("")
  total = len([k for k in rows() if k.startswith("run|")])
  by_config = {}
  for key in missing:
    _, spec, cls, slice_name, dtype = key.split("|")
    by_config.setdefault(spec.split(":")[0].replace("configs/", ""), []).append(
      f"{cls} {slice_name} {dtype}"
    )
  lines.append(
    f"{total - len(missing)} of {total} rows compiled so far. Not compiled yet: "
    + "; ".join(f"{c}: {', '.join(v)}" for c, v in by_config.items())
    + "."
    if missing
    else f"All {total} rows compiled."
  )
  chunk = [
    "| m | chunks/chip | strategy | GiB/chip (args + temp + out - donated) | XLA TFLOP/chip "
    "| compile here |",
    "|---|---|---|---|---|---|",
  ]
  for m, mode in CHUNK_CASES:
    r = data.get(f"chunks|{m}|{mode}")
    n = 2048 // 4 // m
    if r is None:
      chunk.append(f"| {m} | {n} | {mode} | not compiled | | |")
    elif "error" in r:
      chunk.append(f"| {m} | {n} | {mode} | error: {r['error']} | | |")
    elif "unfinished_cpu_s" in r:
      chunk.append(f"| {m} | {n} | {mode} | stopped unfinished | | {compile_time(r, 's')} |")
    else:
      when = compile_time(r, "s")
      chunk.append(
        f"| {m} | {n} | {mode} | {r['total_gib']:.2f} ({r['argument_gib']:.2f} + "
        f"{r['temp_gib']:.2f} + {r['output_gib']:.2f} - {r['alias_gib']:.2f}) | "
        f"{r['xla_tflop' if 'xla_tflop' in r else 'tflop']:.3f} | {when} |"
      )
  return "\n".join(lines), "\n".join(chunk)


def write_markdown() -> None:
  table, chunk = markdown()
  lines = load().get(HEADLINE, {}).get("lines")
  command = (
    "```\n" + "\n".join(lines) + "\n```"
    if lines
    else "(the lines of this command: not compiled yet on this machine)"
  )
  with open(DOCS) as f:
    text = f.read()
  blocks = ((BEGIN, END, table), (CHUNK_BEGIN, CHUNK_END, chunk), (LINES_BEGIN, LINES_END, command))
  for begin, end, body in blocks:
    if begin not in text:
      sys.exit(f"{DOCS} has no {begin} marker")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = f"{head}{begin}\n{body}\n{end}{tail}"
  with open(DOCS, "w") as f:
    f.write(text)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--one", help="compile one row (KEY) and append it to the JSON")
  p.add_argument("--markdown", action="store_true", help="rewrite the tables in docs/benchmarks.md")
  p.add_argument(
    "--shard",
    default="0/1",
    help="I/N: compile every N-th missing row from the I-th (parallel workers)",
  )
  p.add_argument(
    "--cpu_budget_min",
    type=float,
    default=0,
    help="stop a row's compile after this much CPU time and record it as unfinished (0: none)",
  )
  a = p.parse_args()
  i, _, n = a.shard.partition("/")
  if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
    p.error(f"--shard={a.shard}: expected I/N with 0 <= I < N, e.g. --shard=1/2")
  if a.cpu_budget_min < 0:
    p.error(f"--cpu_budget_min={a.cpu_budget_min:g}: expected minutes >= 0 (0: no budget)")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if a.one:
    row = compile_one(a.one)
    save(a.one, row)
    print(json.dumps(row))
  elif a.markdown:
    write_markdown()
  else:
    run_all(int(i), int(n), a.cpu_budget_min)


if __name__ == "__main__":
  main()
