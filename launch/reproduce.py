#!/usr/bin/env python3
"""Small-scale reproduction of Tables 1 / B.1 on digits and spurious digits, on a CPU.

  python launch/reproduce.py --root=/tmp/repro

Stages, each skipping what ROOT already holds (an interrupted command continues where it
stopped; a run cut short resumes from its checkpoint):
  1. search   per benchmark, seed 0, on its validation carve-out (BENCH_val: train on the first
              1150 training images, validate on the other 288; never a test split): the grids of
              SEARCH, one stage after another (the learning rate first, then every radius at that
              learning rate). Runs in ROOT/search/<benchmark>/<stage>-<k>; grid, accuracies and
              winners in ROOT/search.json and ROOT/search.md.
  2. runs     every METHOD x seed x benchmark of configs/reproduce.py with the winners:
              ROOT/runs/<benchmark>/<method>-s<seed>; then each run's sharpness (sharpness.json).
  3. tables   `python -m pf_jax.analysis report --plots` per benchmark:
              ROOT/analysis/<benchmark>/{results.md, results.csv, accuracy.png, curves.png}, and
              ROOT/analysis/obf_vs_steep.md (OBF minus steepest ascent, paired by seed).
Everything runs in this one process (no interpreter start per run; the seeds of one config share
its compiled programs). The wall time of each run is in ROOT/timings.json.
"""

import argparse
import itertools
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from common import add_override_flag  # noqa: E402  (launch/common.py)

from configs import reproduce  # noqa: E402

CONFIG = os.path.join(REPO_ROOT, "configs", "reproduce.py")
BENCHMARKS = ("digits", "spurious")
METHODS = tuple(reproduce.METHODS)  # Table B.1's rows, named once in configs/reproduce.py
# The search: (stage, method trained, grid {field or tuple of fields: values}). Stages run in
# order, each on top of the winners of the earlier ones.
SEARCH = (
  ("lr", "adamw", {"lr_max": (1e-3, 3e-3, 1e-2)}),
  ("steep", "sam_steep", {"sam.rho_max": (0.03, 0.1, 0.3)}),
  (
    "obf",
    "sam_obf",
    {
      "sam.rho_max": (0.03, 0.1, 0.3),
      # (lambda, gamma): the paper's 1/C and 1, and a softer forgetting from a higher threshold
      ("sam.obf_lambda", "sam.obf_gamma"): ((0.1, 1.0), (0.3, 0.5)),
    },
  ),
  ("asam", "asam_steep", {"sam.rho_max": (0.3, 1.0, 3.0)}),
)
# Which stages' winners each method takes (every method takes the learning rate).
USES = {
  "adamw": ("lr",),
  "sam_steep": ("lr", "steep"),
  "sam_obf": ("lr", "obf"),
  "gsam_steep": ("lr", "steep"),
  "gsam_obf": ("lr", "obf"),
  "asam_steep": ("lr", "asam"),
  "asam_obf": ("lr", "asam", "obf_shape"),  # ASAM's radius, OBF's lambda and gamma
  "random_sam": ("lr", "steep"),
  "label_smoothing": ("lr",),
  "shrink_perturb": ("lr",),
}
PAIRS = tuple((label.split(":")[0], a, b) for label, a, b in reproduce.COMPARED)


def _csv(kind):
  return lambda text: [kind(v) for v in text.split(",") if v]


def grid_points(grid: dict, max_values: int) -> list[dict]:
  """Every combination of the grid (each axis cut to its first `max_values`), as field dicts."""
  axes = [
    [dict(zip(k, v)) if isinstance(k, tuple) else {k: v} for v in values[:max_values]]
    for k, values in grid.items()
  ]
  return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*axes)]


def winners_for(method: str, winners: dict) -> dict:
  """The searched field values `method` trains with."""
  out = {}
  for stage in USES[method]:
    if stage == "obf_shape":
      out.update({k: v for k, v in winners.get("obf", {}).items() if k != "sam.rho_max"})
    else:
      out.update(winners.get(stage, {}))
  return out


class Runner:
  """Trains runs in this process, skipping finished ones, and records their wall times."""

  def __init__(self, root: str, overrides: list[tuple[str, str]]):
    import jax  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    from pf_jax import process  # pylint: disable=g-import-not-at-top

    # One line per run from here (below); compiled programs that recur (evaluation, the
    # sharpness' Hessian-vector product) are read from a persistent cache.
    logging.set_verbosity(logging.WARNING)
    process.skip_absent_tpu()  # no libtpu probing on a machine without a TPU (main.py's)
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    with process.quiet_native_stderr():
      from pf_jax import checkpointing  # pylint: disable=g-import-not-at-top
      from pf_jax import cli  # pylint: disable=g-import-not-at-top
      from pf_jax import config_validation  # pylint: disable=g-import-not-at-top
      from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top
      from pf_jax import train  # pylint: disable=g-import-not-at-top
      from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
      from pf_jax.analysis import sharpness  # pylint: disable=g-import-not-at-top
    input_pipeline.tfds.disable_progress_bar()
    self.cli, self.train, self.workdir_lib, self.sharpness = cli, train, workdir_lib, sharpness
    self.checkpointing = checkpointing
    self.validate = lambda c: config_validation.validate(c, jax.device_count(), jax.process_count())
    self.root = root
    self.overrides = overrides
    self.timings_path = os.path.join(root, "timings.json")
    self.cache = {}  # programs shared by the seeds of a config, batches by the methods of a seed
    self.timings = {}
    if os.path.exists(self.timings_path):
      with open(self.timings_path) as f:
        self.timings = json.load(f)

  def train_run(self, workdir: str, arg: str, fields: dict) -> dict[str, float]:
    """Final eval metrics of configs/reproduce.py:ARG with `fields` and the global overrides."""
    if not os.path.exists(os.path.join(workdir, "results.json")):
      overrides = [(k, repr(v)) for k, v in fields.items()] + self.overrides
      config = self.cli.build_config(f"{CONFIG}:{arg}", overrides)
      self.validate(config)  # the boundary: train_and_evaluate takes a valid config
      start, cpu = time.time(), os.times()
      try:
        self.train.train_and_evaluate(config, workdir, cache=self.cache)
      except self.checkpointing.Preempted as e:  # SIGTERM/SIGINT: the run's step is saved
        print(f"{os.path.relpath(workdir, self.root)}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(self.checkpointing.PREEMPTED_EXIT_CODE) from None
      self.record(workdir, "train", time.time() - start)
      now = os.times()  # this process's CPU seconds (on a shared machine, less than 2 x wall)
      self.record(workdir, "train_cpu", now.user + now.system - cpu.user - cpu.system)
      results = self.workdir_lib.load_results(workdir)
      print(
        f"{os.path.relpath(workdir, self.root)}: {time.time() - start:.0f} s, "
        + " ".join(f"{k}={v:.4f}" for k, v in sorted(results.items()) if k.startswith("eval/")),
        flush=True,
      )
    return self.workdir_lib.load_results(workdir)

  def sharpness_of(self, workdir: str) -> None:
    if self.sharpness.load(workdir) is None:
      start = time.time()
      value = self.sharpness.checkpoint_sharpness(workdir)["sharpness"]
      self.record(workdir, "sharpness", time.time() - start)
      rel = os.path.relpath(workdir, self.root)
      print(f"{rel}: sharpness {value:.4g} ({time.time() - start:.0f} s)", flush=True)

  def record(self, workdir, what, seconds):
    """Adds a wall time (seconds) to ROOT/timings.json."""
    self.timings.setdefault(os.path.relpath(workdir, self.root), {})[what] = round(seconds, 1)
    with open(self.timings_path, "w") as f:
      json.dump(self.timings, f, indent=1, sort_keys=True)


def search(runner: Runner, benchmark: str, max_values: int, needed: set) -> dict:
  """Runs the search stages `needed` on BENCH_val; returns {stage: {grid, scores, winner}}."""
  winners, record = {}, {}
  for stage, method, grid in SEARCH:
    if stage not in needed:
      continue
    fixed = winners_for(method, winners)
    scores = []
    for k, point in enumerate(grid_points(grid, max_values)):
      workdir = os.path.join(runner.root, "search", benchmark, f"{stage}-{k}")
      results = runner.train_run(workdir, f"{benchmark}_val,{method}", {**fixed, **point})
      scores.append((point, results[f"eval/{_val_dataset(benchmark)}/top1"]))
    # Highest validation top-1; ties go to the earlier grid point (the smaller values).
    best = max(range(len(scores)), key=lambda i: (scores[i][1], -i))
    winners[stage] = scores[best][0]
    record[stage] = {
      "method": method,
      "fixed": fixed,
      "grid": {" ".join(k) if isinstance(k, tuple) else k: v for k, v in grid.items()},
      "scores": [{"point": p, "val_top1": a} for p, a in scores],
      "winner": scores[best][0],
    }
  return record


def _val_dataset(benchmark: str) -> str:
  return {"digits": "digits_val", "spurious": "spurious_digits_val"}[benchmark]


def search_markdown(searches: dict) -> str:
  lines = ["# Hyperparameter search (seed 0, validation carve-out: last 288 training images)", ""]
  for benchmark, record in searches.items():
    lines += [
      f"## {benchmark}",
      "",
      "| stage | method | point | val top-1 (%) | |",
      "|---|---|---|---|---|",
    ]
    for stage, r in record.items():
      for s in r["scores"]:
        point = ", ".join(f"{k}={v:g}" for k, v in s["point"].items())
        mark = "**winner**" if s["point"] == r["winner"] else ""
        lines.append(f"| {stage} | {r['method']} | {point} | {100 * s['val_top1']:.2f} | {mark} |")
    lines.append("")
  return "\n".join(lines)


def obf_vs_steep(root: str, benchmarks, seeds, eval_sets: dict) -> str:
  """OBF minus steepest-ascent top-1 (points), paired by seed: mean ± std over seeds."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  lines = [
    "| benchmark | framework | eval set | steep | OBF | OBF − steep (paired) | seeds OBF > steep |",
    "|---|---|---|---|---|---|---|",
  ]
  for b in benchmarks:
    for name, steep, obf in PAIRS:
      dirs = [
        tuple(os.path.join(root, "runs", b, f"{m}-s{s}") for m in (steep, obf)) for s in seeds
      ]
      dirs = [
        d
        for d in map(tuple, dirs)
        if all(os.path.exists(os.path.join(x, "results.json")) for x in d)
      ]
      if not dirs:
        continue
      for e in eval_sets[b]:
        key = f"eval/{e}/top1"
        pairs = np.array([[100 * workdir_lib.load_results(x)[key] for x in d] for d in dirs])
        diff = pairs[:, 1] - pairs[:, 0]
        std = f" ± {diff.std(ddof=1):.2f}" if len(diff) > 1 else ""
        lines.append(
          f"| {b} | {name} | {e} | {pairs[:, 0].mean():.2f} | {pairs[:, 1].mean():.2f} | "
          f"{diff.mean():+.2f}{std} | {int((diff > 0).sum())}/{len(diff)} |"
        )
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--root", required=True, help="everything is written under it")
  parser.add_argument("--benchmarks", type=_csv(str), default=list(BENCHMARKS))
  parser.add_argument("--methods", type=_csv(str), default=list(METHODS))
  parser.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
  parser.add_argument(
    "--max_grid", type=int, default=100, help="cut every search axis to its first N values"
  )
  add_override_flag(
    parser, "config field=value for every run, search included (e.g. num_train_steps=5)"
  )
  args = parser.parse_args(argv)
  for name, values, allowed in (
    ("benchmarks", args.benchmarks, BENCHMARKS),
    ("methods", args.methods, METHODS),
  ):
    if unknown := sorted(set(values) - set(allowed)):
      parser.error(f"unknown {name} {unknown}; choose from {list(allowed)}")
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  start = time.time()
  overrides = [tuple(f[len("--config.") :].split("=", 1)) for f in args.override]
  runner = Runner(root, overrides)

  # 1. Search (only the stages the chosen methods use).
  needed = {s for m in args.methods for s in USES[m]}
  needed |= {"obf"} if "obf_shape" in needed else set()
  searches = {b: search(runner, b, args.max_grid, needed) for b in args.benchmarks}
  with open(os.path.join(root, "search.json"), "w") as f:
    json.dump(searches, f, indent=1)
  with open(os.path.join(root, "search.md"), "w") as f:
    f.write(search_markdown(searches))
  print(f"search done ({time.time() - start:.0f} s so far); see {root}/search.md", flush=True)

  # 2. Every method x seed, then sharpness.

  # Seed-major order: a reproduction stopped early has every method with the same seeds.
  workdirs = {b: [] for b in args.benchmarks}
  for seed in args.seeds:
    for b in args.benchmarks:
      winners = {stage: r["winner"] for stage, r in searches[b].items()}
      for method in args.methods:
        workdir = os.path.join(root, "runs", b, f"{method}-s{seed}")
        fields = {**winners_for(method, winners), "seed": seed}
        runner.train_run(workdir, f"{b},{method}", fields)
        workdirs[b].append(workdir)
  for b in args.benchmarks:
    for workdir in workdirs[b]:
      runner.sharpness_of(workdir)
  print(f"runs and sharpness done ({time.time() - start:.0f} s so far)", flush=True)

  # 3. Tables and plots.
  from pf_jax.analysis import report  # pylint: disable=g-import-not-at-top

  for b in args.benchmarks:
    out = os.path.join(root, "analysis", b)
    print(f"## {b}\n" + report.report(workdirs[b], out, plots=True), flush=True)
  eval_sets = {b: reproduce.BENCHMARKS[b][1] for b in args.benchmarks}
  text = obf_vs_steep(root, args.benchmarks, args.seeds, eval_sets)
  with open(os.path.join(root, "analysis", "obf_vs_steep.md"), "w") as f:
    f.write(text)
  print(text, end="")
  total = time.time() - start
  runner.record(root, f"invocation {time.strftime('%Y-%m-%d %H:%M:%S')}", total)
  print(f"reproduction done in {total:.0f} s; see {root}/analysis and {root}/search.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
