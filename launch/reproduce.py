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
import os
import sys
import time

if not __package__:  # `python launch/reproduce.py`: the repository on sys.path, as for -m
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import reproduce  # noqa: E402
from launch import search  # noqa: E402
from launch.common import add_override_flag  # noqa: E402
from launch.common import csv_list  # noqa: E402
from launch.common import override_pairs  # noqa: E402
from launch.common import reject_unknown  # noqa: E402

BENCHMARKS = ("digits", "spurious")
METHODS = tuple(reproduce.METHODS)  # Table B.1's rows, named once in configs/reproduce.py
# The search: (stage, method trained, grid {field or tuple of fields: values}). Stages run in
# order, each on top of the winners of the earlier ones (which stages' winners each method
# takes: launch/search.py's USES).
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
PAIRS = tuple((label.split(":")[0], a, b) for label, a, b in reproduce.COMPARED)
TITLE = "Hyperparameter search (seed 0, validation carve-out: last 288 training images)"


def search_benchmark(runner, benchmark: str, max_values: int, needed: set) -> dict:
  """The stages `needed` on BENCHMARK_val, seed 0, one run per point (ROOT/search/BENCH/STAGE-K)."""

  def score(stage, method, fixed, k, point):
    return runner.val_top1(benchmark, f"{stage}-{k}", method, {**fixed, **point}), {}

  return search.search(SEARCH, needed, score, max_values, with_grid=True)


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
  parser.add_argument("--benchmarks", type=csv_list(str), default=list(BENCHMARKS))
  parser.add_argument("--methods", type=csv_list(str), default=list(METHODS))
  parser.add_argument("--seeds", type=csv_list(int), default=[0, 1, 2])
  parser.add_argument(
    "--max_grid", type=int, default=100, help="cut every search axis to its first N values"
  )
  add_override_flag(
    parser, "config field=value for every run, search included (e.g. num_train_steps=5)"
  )
  args = parser.parse_args(argv)
  reject_unknown(
    parser, ("benchmarks", args.benchmarks, BENCHMARKS), ("methods", args.methods, METHODS)
  )
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  start = time.time()
  runner = search.Runner(root, override_pairs(args.override))

  # 1. Search (only the stages the chosen methods use).
  needed = search.stages_needed(args.methods)
  searches = {b: search_benchmark(runner, b, args.max_grid, needed) for b in args.benchmarks}
  search.save_search(root, searches, TITLE, start)

  # 2. Every method x seed, then sharpness.

  # Seed-major order: a reproduction stopped early has every method with the same seeds.
  workdirs = {b: [] for b in args.benchmarks}
  for seed in args.seeds:
    for b in args.benchmarks:
      winners = {stage: r["winner"] for stage, r in searches[b].items()}
      for method in args.methods:
        workdir = os.path.join(root, "runs", b, f"{method}-s{seed}")
        fields = {**search.winners_for(method, winners), "seed": seed}
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
  total = runner.record_invocation(start)
  print(f"reproduction done in {total:.0f} s; see {root}/analysis and {root}/search.md")
  return 0


if __name__ == "__main__":
  sys.exit(main())
