#!/usr/bin/env python3
"""Where does SAM matter at small scale, and does OBF beat steepest ascent there? (issue 29)

  nice -n 19 python launch/science.py --root=/tmp/science           # everything, in order
  python launch/science.py --root=/tmp/science --blocks=noise50 --seeds=0-9   # or a part
  python -m pf_jax.analysis.science results/science                  # the tables, no training

The protocol is results/science/PROTOCOL.md (committed before the first run). Blocks run in
the order of pf_jax/analysis/science.py's BLOCKS (most informative first), then the search;
within a block seed-major (every arm of seed 0, then of seed 1, ...), so a stopped invocation
leaves every arm of a block with the same seeds. Each finished run appends one JSON line (block,
method, rho, seed, its config fields, every final metric, sharpness, wall and CPU seconds, the
commit) to RESULTS/runs.jsonl (search runs: RESULTS/search.jsonl) and rewrites RESULTS/runs.csv
and RESULTS/tables.md (as `python -m pf_jax.analysis.science RESULTS` does); a run whose key (block, method, rho, seed) is already there is skipped,
so any invocation resumes where the last one stopped and parts can run on other machines (their
.jsonl files concatenate). Checkpoints go under ROOT (not committed).
"""

import argparse
import json
import os
import subprocess
import sys
import time

if not __package__:  # `python launch/science.py`: the repository on sys.path, as for -m
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.common import REPO_ROOT  # noqa: E402
from launch.common import seed_range  # noqa: E402
from launch.search import CONFIG  # noqa: E402
from launch.search import Runner  # noqa: E402
from pf_jax.analysis import science  # noqa: E402

RESULTS = os.path.join(REPO_ROOT, "results", "science")
SEARCH = "search"  # the --blocks name of the validation search (science.SEARCH_BLOCK)
ORDER = ("noise50", "noise50_obf", SEARCH, "noise25", "clean", "spurious")
# Every run: configs/reproduce.py's setting (vit_digits, 275 steps, batch 128, m = 32), evaluated
# once at the end; sharpness on the first 512 training images (30 power iterations).
RUN_OVERRIDES = {"eval_every_steps": 100_000}
# CPU seconds per run with its sharpness, measured on this 2-core machine shared at load 6-11
# once a config is compiled (its first seed: ~80; results/science/PROTOCOL.md, amendment 1); a
# search run (no sharpness, 1150 images) scaled from it. Only for the estimate printed first, and
# only for a block without rows yet: otherwise its rows' own mean (spurious: ~58, its OOD set).
RUN_CPU_S, SEARCH_CPU_S = 50.0, 35.0


def cpu_seconds(rows: list[dict], block: str, default: float) -> float:
  """The mean CPU seconds (training + sharpness) of `block`'s finished rows, else `default`."""
  costs = [
    r.get("train_cpu_s", 0) + r.get("sharpness_cpu_s", 0) for r in rows if r["block"] == block
  ]
  return sum(costs) / len(costs) if costs else default


def plan(blocks, seeds) -> list[tuple[str, str, float, int]]:
  """(block, method, rho, seed) in training order."""
  out = []
  for name in blocks:
    if name == SEARCH:
      out += [
        (science.SEARCH_BLOCK, m, r, s)
        for m in ("sam_steep", "sam_obf")
        for r in science.DOSES
        for s in science.SEARCH_SEEDS
      ]
    else:
      out += [(name, m, r, s) for s in seeds for m, r in science.arms(science.BLOCK[name])]
  return out


def fields_of(block: str, method: str, rho: float, seed: int, search: bool) -> dict:
  b = science.BLOCK[block]
  dataset = f"{b.dataset}_val" if search else b.dataset
  f = {
    "dataset": dataset,
    "eval_datasets": dataset if search else ",".join(b.eval_datasets),
    "lr_max": b.lr_max,
    "seed": seed,
    **RUN_OVERRIDES,
  }
  if method != "adamw":
    f["sam.rho_max"] = rho
  if method == "sam_obf":
    f.update({f"sam.{k}": v for k, v in science.OBF_FIELDS.items()})
  return f


def commit() -> str:
  """The code's commit: $PF_JAX_COMMIT (a run from an exported copy), else git's HEAD."""
  if os.environ.get("PF_JAX_COMMIT"):
    return os.environ["PF_JAX_COMMIT"]
  try:
    head = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    return head or "unknown"
  except OSError:
    return "unknown"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--root", required=True, help="run folders (checkpoints) go under it")
  parser.add_argument("--results", default=RESULTS, help="where the rows are appended")
  parser.add_argument(
    "--blocks", type=lambda t: [v for v in t.split(",") if v], default=list(ORDER)
  )
  parser.add_argument(
    "--seeds", type=seed_range, default=list(range(science.SEEDS)), help="e.g. 0-9 (0-19)"
  )
  parser.add_argument("--dry_run", action="store_true", help="print the plan and the estimate")
  args = parser.parse_args(argv)
  if unknown := [b for b in args.blocks if b not in ORDER]:
    parser.error(f"--blocks: unknown {unknown}; choose from {list(ORDER)}")
  os.makedirs(args.results, exist_ok=True)
  rows = {f: science.read_rows(args.results, f) for f in ("runs.jsonl", "search.jsonl")}
  done = {f: {(r["block"], r["method"], r["rho"], r["seed"]) for r in rs} for f, rs in rows.items()}
  todo = []
  for name in args.blocks:
    file = "search.jsonl" if name == SEARCH else "runs.jsonl"
    todo += [(name == SEARCH, k) for k in plan([name], args.seeds) if k not in done[file]]
  n_search = sum(s for s, _ in todo)
  per_run = {  # each block's CPU seconds a run, computed once
    (search, b): cpu_seconds(
      rows["search.jsonl" if search else "runs.jsonl"], b, SEARCH_CPU_S if search else RUN_CPU_S
    )
    for search, b in {(search, k[0]) for search, k in todo}
  }
  cpu = sum(per_run[search, b] for search, (b, _, _, _) in todo)
  print(
    f"to do: {len(todo) - n_search} runs with sharpness and {n_search} search runs, about "
    f"{cpu / 3600:.1f} CPU-hours (each block's mean so far, else {RUN_CPU_S:g} / "
    f"{SEARCH_CPU_S:g} CPU-s a run); results in {args.results}",
    flush=True,
  )
  if args.dry_run:
    for search, (b, m, r, s) in todo:
      print(f"{'search ' if search else ''}{b} {m} rho={r:g} seed={s}")
    return 0
  runner = Runner(os.path.abspath(args.root), [])
  head = commit()
  for search, (block, method, rho, seed) in todo:
    fields = fields_of(block, method, rho, seed, search)
    sub = "search" if search else "runs"
    workdir = os.path.join(runner.root, sub, block, f"{method}-rho{rho:g}-s{seed}")
    arg = "spurious" if block == "spurious" else "digits"
    overrides = [(k, v if isinstance(v, str) else repr(v)) for k, v in fields.items()]
    start, t0 = time.time(), os.times()
    if not os.path.exists(os.path.join(workdir, "results.json")):
      config = runner.cli.build_config(
        f"{CONFIG}:{arg}{'_val' if search else ''},{method}", overrides
      )
      runner.validate(config)
      try:
        runner.train.train_and_evaluate(config, workdir, cache=runner.cache)
      except runner.checkpointing.Preempted as e:
        print(f"{workdir}: {e}", file=sys.stderr, flush=True)
        return runner.checkpointing.PREEMPTED_EXIT_CODE
    t1 = os.times()
    row = {
      "block": block,
      "method": method,
      "rho": rho,
      "seed": seed,
      "config": {
        **fields,
        "base": f"{arg},{method}",
        **({} if method == "adamw" else {"sam.m": 32}),
      },
      "results": runner.workdir_lib.load_results(workdir),
      "train_s": round(time.time() - start, 1),
      "train_cpu_s": round(t1.user + t1.system - t0.user - t0.system, 1),
      "commit": head,
      "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not search:
      s0 = time.time()
      runner.sharpness_of(workdir)
      t2 = os.times()
      row["sharpness"] = runner.sharpness.load(workdir)
      row["sharpness_s"] = round(time.time() - s0, 1)
      row["sharpness_cpu_s"] = round(t2.user + t2.system - t1.user - t1.system, 1)
    with open(os.path.join(args.results, f"{sub if search else 'runs'}.jsonl"), "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    acc = {
      k.split("/")[1]: round(100 * v, 2) for k, v in row["results"].items() if k.endswith("/top1")
    }
    print(
      f"{block} {method} rho={rho:g} seed={seed}: {acc} sharpness={row.get('sharpness', '-')} "
      f"({row['train_cpu_s'] + row.get('sharpness_cpu_s', 0):.0f} CPU-s)",
      flush=True,
    )
    if not search:
      science.write_csv(args.results)
    with open(os.path.join(args.results, "tables.md"), "w") as f:
      f.write(science.report(args.results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
