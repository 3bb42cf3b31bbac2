#!/usr/bin/env python3
"""OBF versus steepest ascent at small scale: a powered, paired experiment on a CPU.

  python launch/powered.py --root=/tmp/powered                  # all of it
  python launch/powered.py --root=/tmp/powered --seeds=0-19     # or in parts, in any order,
  python launch/powered.py --root=/tmp/powered --seeds=20-37    # each part restartable

Every invocation skips what ROOT already holds (an interrupted run resumes from its checkpoint)
and ends by rewriting the tables from every finished run, so parts can be run on different days.
In one invocation the seeds of a config share its compiled programs and the methods of a seed
share its training batches (bit-identical to separate runs); ROOT/jax_cache keeps compiled
programs across invocations.

  1. seeds    per benchmark, enough paired seeds to resolve EFFECT (points of top-1) with 80%
              power in a two-sided paired t-test at 5%, with the paired standard deviation
              REPORT.md measured (PAIRED_SD), never fewer than MIN_SEEDS
              (pf_jax/analysis/paired.py: required_pairs). The compared rows (OBF and STEEP of
              SAM, GSAM, ASAM) train with that many seeds, the references (AdamW, label
              smoothing, shrink-and-perturb) with MIN_SEEDS.
  2. search   per benchmark, on its validation carve-out only (BENCH_val: train on the first
              1150 training images, score on the other 288; never a test split): the stages of
              SEARCH in order, each on top of the earlier winners. Every grid point is scored by
              its mean validation top-1 over SEARCH_SEEDS; ties go to the earlier point. STEEP and
              OBF get grids of the same size. A winner on the edge of a numeric axis adds the
              next point beyond that edge (the same ratio as the last step), up to MAX_EXTEND
              times per stage. ROOT/search.json, ROOT/search.md.
  3. runs     ROOT/runs/<benchmark>/<method>-s<seed> with the winners, evaluated once, at the
              end (digits: test; spurious: test_id, test_ood and test_ood_all, the 3,231 images
              of every test image with each wrong cue).
  4. tables   ROOT/analysis/paired.md (OBF − STEEP per framework and the references, paired by
              seed: mean, 95% t interval, t / Wilcoxon / sign p-values, wins, split-half check;
              every method's mean with its interval), paired.json, paired.png (the paired
              differences with their intervals).
The estimated wall time is printed at the start; every run's wall time goes to ROOT/timings.json.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

if not __package__:  # `python launch/powered.py`: the repository on sys.path, as for -m
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import reproduce  # noqa: E402
from launch import search  # noqa: E402
from launch.common import add_override_flag  # noqa: E402
from launch.common import csv_list  # noqa: E402
from launch.common import override_pairs  # noqa: E402
from launch.common import reject_unknown  # noqa: E402
from launch.common import seed_range  # noqa: E402
from pf_jax.analysis import paired  # noqa: E402

BENCHMARKS = ("digits", "spurious")
# Power (REPORT.md, "Power"): the effect to resolve and the largest paired OBF − STEEP standard
# deviation REPORT measured (3 seeds, two runs of the reproduction), on the metric that decides.
EFFECT = {"digits": 1.0, "spurious": 2.0}
PAIRED_SD = {"digits": 1.47, "spurious": 4.26}  # digits: SAM, run 2; OOD: GSAM, run 2
DECIDING_METRIC = {"digits": "digits", "spurious": "spurious_digits_ood"}
MIN_SEEDS = 20
COMPARED_METHODS = tuple(dict.fromkeys(m for _, a, b in reproduce.COMPARED for m in (a, b)))
REFERENCE_METHODS = tuple(dict.fromkeys(m for _, a, b in reproduce.REFERENCES for m in (a, b)))
SEARCH_SEEDS = (0, 1, 2)
MAX_EXTEND = 2
# (stage, method trained, grid {field or tuple of fields: values}); stage names as in
# launch/search.py's USES (which stages' winners each method takes). STEEP and OBF: 4 points.
SEARCH = (
  ("lr", "adamw", {"lr_max": (1e-3, 3e-3, 1e-2)}),
  ("steep", "sam_steep", {"sam.rho_max": (0.01, 0.03, 0.1, 0.3)}),
  (
    "obf",
    "sam_obf",
    {
      "sam.rho_max": (0.03, 0.1),
      # (lambda, gamma): the paper's 1/C and 1, and a softer forgetting from a higher threshold
      ("sam.obf_lambda", "sam.obf_gamma"): ((0.1, 1.0), (0.3, 0.5)),
    },
  ),
  ("asam", "asam_steep", {"sam.rho_max": (0.3, 1.0, 3.0)}),
)
# Wall seconds measured on this 2-core CPU while shared (load average ~10; docs/reproduction.md,
# "Wall time"): a search run (200 steps) and a training run (275 steps) of a SAM-family method
# whose programs this process already compiled (every seed of a config after its first:
# train.cached_program), and the first seed of a config on top (tracing and compiling). At that load a run
# got CORES cores: the work is CPU-bound, so an idle machine gives it up to 2.
SEARCH_RUN_S, TRAIN_RUN_S, CONFIG_S, CORES = 18.0, 23.0, 40.0, 0.75
# Evaluated once, at the last step (no curves): the powered runs only need the final accuracy.
RUN_OVERRIDES = (("eval_every_steps", 100_000),)


def seeds_needed(benchmark: str) -> int:
  """Paired seeds for the compared rows of `benchmark` (module doc, step 1)."""
  return max(MIN_SEEDS, paired.required_pairs(PAIRED_SD[benchmark], EFFECT[benchmark]))


def point_name(point: dict) -> str:
  return ",".join(f"{k.split('.')[-1]}={v:g}" for k, v in point.items())


def search_benchmark(runner, benchmark: str, needed: set, seeds, max_values: int) -> dict:
  """The stages `needed` on BENCHMARK_val, every point scored by its mean over `seeds`
  (ROOT/search/BENCH/STAGE-POINT-sSEED), edge winners extended up to MAX_EXTEND times."""

  def score(stage, method, fixed, k, point):
    accs = [
      runner.val_top1(
        benchmark,
        f"{stage}-{point_name(point)}-s{s}",
        method,
        {**fixed, **point, "seed": s, **dict(RUN_OVERRIDES)},
      )
      for s in seeds
    ]
    return sum(accs) / len(accs), {"per_seed": accs}

  return search.search(SEARCH, needed, score, max_values, MAX_EXTEND)


def search_title(seeds) -> str:
  return (
    f"Hyperparameter search (mean over seeds {list(seeds)}; validation carve-out: the last"
    " 288 training images)"
  )


def plan(benchmarks, methods, seeds) -> dict:
  """{benchmark: [(method, seed)]} to train: compared rows up to seeds_needed, references up to
  MIN_SEEDS, restricted to `seeds` (None: all). Seed-major order."""
  out = {}
  for b in benchmarks:
    limit = {m: seeds_needed(b) if m in COMPARED_METHODS else MIN_SEEDS for m in methods}
    top = max(limit.values(), default=0)
    chosen = range(top) if seeds is None else [s for s in seeds if s < top]
    out[b] = [(m, s) for s in chosen for m in methods if s < limit[m]]
  return out


def estimate_seconds(root: str, todo: dict, needed: set, max_values: int, n_search: int):
  """(search runs, training runs, seconds, seconds if every stage extends MAX_EXTEND times) still
  to do, at the measured per-run and per-config times (SEARCH_RUN_S, TRAIN_RUN_S, CONFIG_S)."""
  left = [
    (b, m)
    for b, items in todo.items()
    for m, s in items
    if not os.path.exists(os.path.join(root, "runs", b, f"{m}-s{s}", "results.json"))
  ]
  extendable = [  # stages with a numeric axis of at least two values (search.search_stage)
    st
    for st, _, g in SEARCH
    if st in needed
    and any(not isinstance(k, tuple) and len(v[:max_values]) > 1 for k, v in g.items())
  ]
  points = sum(len(search.grid_points(g, max_values)) for st, _, g in SEARCH if st in needed)
  done = len(_glob_results(os.path.join(root, "search")))
  searches = max(0, points * n_search * len(todo) - done)
  configs = (searches + n_search - 1) // n_search + len(set(left))  # first seeds compile
  seconds = searches * SEARCH_RUN_S + len(left) * TRAIN_RUN_S + configs * CONFIG_S
  extend = MAX_EXTEND * len(extendable) * len(todo) * (n_search * SEARCH_RUN_S + CONFIG_S)
  return searches, len(left), seconds, seconds + (extend if searches else 0)


def _glob_results(folder):
  import glob  # pylint: disable=g-import-not-at-top

  return glob.glob(os.path.join(folder, "*", "*", "results.json"))


def collect(root: str, benchmark: str) -> dict:
  """{method: {seed: final results}} of every finished run of `benchmark` under ROOT/runs."""
  folder = os.path.join(root, "runs", benchmark)
  out = {}
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    path = os.path.join(folder, name, "results.json")
    method, _, seed = name.rpartition("-s")
    if os.path.exists(path) and seed.isdigit():
      with open(path) as f:
        out.setdefault(method, {})[int(seed)] = json.load(f)
  return out


def tables(root: str, benchmarks) -> str:
  """ROOT/analysis/paired.{md,json,png} from every finished run; returns the markdown."""
  out_dir = os.path.join(root, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  md, record, plot_rows = [], {}, []
  for b in benchmarks:
    results = collect(root, b)
    metrics = [f"eval/{e}/top1" for e in reproduce.BENCHMARKS[b][1]]
    have = min((len(results.get(m, {})) for m in COMPARED_METHODS), default=0)
    status = "complete" if have >= seeds_needed(b) else "**PENDING** (not yet powered)"
    md += [
      f"## {b}",
      "",
      f"Paired seeds needed (compared rows): {seeds_needed(b)} (a {EFFECT[b]:g}-point difference"
      f" on {DECIDING_METRIC[b]}, paired sd {PAIRED_SD[b]}, 80% power, 5% two-sided); "
      f"finished for every compared row: {have}: {status}.",
      "",
    ]
    lines, rows = paired.comparison_table(results, reproduce.COMPARED, metrics)
    ref_lines, ref_rows = paired.comparison_table(results, reproduce.REFERENCES, metrics)
    md += lines + ref_lines[2:] + [""]
    plot_rows += [(f"{b}: {label}", *rest) for label, *rest in rows + ref_rows]
    md += ["| method | eval set | seeds | mean top-1 (%) | 95% CI |", "|---|---|---|---|---|"]
    for method in (*COMPARED_METHODS, *REFERENCE_METHODS):
      for metric in metrics:
        values = [100 * r[metric] for r in results.get(method, {}).values() if metric in r]
        if values:
          s = paired.summarize(values)
          ci = f"[{s.lo:.2f}, {s.hi:.2f}]" if s.n > 1 else "–"
          md.append(f"| {method} | {metric.split('/')[1]} | {s.n} | {s.mean:.2f} | {ci} |")
    md.append("")
    record[b] = {
      "seeds_needed": seeds_needed(b),
      "rows": [
        {
          "comparison": label,
          "metric": metric,
          "summary": dataclasses.asdict(s),
          "split_half": None if h is None else {**dataclasses.asdict(h), "agree": h.agree},
        }
        for label, metric, s, h in rows + ref_rows
      ],
    }
  text = "\n".join(md)
  with open(os.path.join(out_dir, "paired.md"), "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "paired.json"), "w") as f:
    json.dump(record, f, indent=1)
  if plot_rows:
    paired.interval_plot(
      [r for r in plot_rows if not math.isnan(r[2].lo)] or plot_rows,
      os.path.join(out_dir, "paired.png"),
      "paired differences (other − base), mean and 95% t interval over seeds",
    )
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--root", required=True, help="everything is written under it")
  parser.add_argument("--benchmarks", type=csv_list(str), default=list(BENCHMARKS))
  parser.add_argument(
    "--methods", type=csv_list(str), default=list(COMPARED_METHODS + REFERENCE_METHODS)
  )
  parser.add_argument(
    "--seeds", type=seed_range, default=None, help="train only these seeds, e.g. 0-9 (all)"
  )
  parser.add_argument("--search_seeds", type=csv_list(int), default=list(SEARCH_SEEDS))
  parser.add_argument("--max_grid", type=int, default=100, help="cut every axis to N values")
  add_override_flag(
    parser, "config field=value for every run, search included (e.g. num_train_steps=5)"
  )
  args = parser.parse_args(argv)
  reject_unknown(
    parser,
    ("benchmarks", args.benchmarks, BENCHMARKS),
    ("methods", args.methods, COMPARED_METHODS + REFERENCE_METHODS),
  )
  if not args.search_seeds:
    parser.error("--search_seeds: at least one seed")
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  start = time.time()

  needed = search.stages_needed(args.methods)
  todo = plan(args.benchmarks, args.methods, args.seeds)
  for b in args.benchmarks:
    print(
      f"{b}: {seeds_needed(b)} paired seeds for the compared rows, {MIN_SEEDS} for the "
      f"references; this invocation: {len(todo[b])} runs",
      flush=True,
    )
  n_search, n_runs, seconds, most = estimate_seconds(
    root, todo, needed, args.max_grid, len(args.search_seeds)
  )
  print(
    f"to do: {n_search} search runs and {n_runs} training runs; estimated {seconds / 3600:.1f} h "
    f"(at most {most / 3600:.1f} h if every stage extends its grid) at the times measured on "
    f"this CPU shared at load ~10 ({SEARCH_RUN_S:g} s per search run, {TRAIN_RUN_S:g} s per "
    f"training run, {CONFIG_S:g} s more for a config's first seed); that is "
    f"{seconds * CORES / 3600:.1f} CPU-hours, {seconds * CORES / 2 / 3600:.1f} h on an idle "
    "2-core CPU if a run keeps both cores busy (num_train_steps overrides are not counted)",
    flush=True,
  )

  runner = search.Runner(root, override_pairs(args.override))
  searches = {
    b: search_benchmark(runner, b, needed, args.search_seeds, args.max_grid) for b in todo
  }
  search.save_search(root, searches, search_title(args.search_seeds), start, each=True)
  runner.cache.clear()  # the search's programs and batches are not used again

  for b, items in todo.items():
    winners = {stage: r["winner"] for stage, r in searches[b].items()}
    for method, seed in items:
      workdir = os.path.join(root, "runs", b, f"{method}-s{seed}")
      fields = {**search.winners_for(method, winners), "seed": seed, **dict(RUN_OVERRIDES)}
      runner.train_run(workdir, f"{b},{method}", fields)

  text = tables(root, args.benchmarks)
  print(text)
  total = runner.record_invocation(start)
  print(f"done in {total:.0f} s; see {root}/analysis/paired.md and paired.png", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
