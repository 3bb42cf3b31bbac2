#!/usr/bin/env python3
"""Train Section 6.1's pool, then its sharpness, Figure 2 and results table.

  python launch/forgetting_pool.py --root=/tmp/pool                                  # digits, a laptop
  python launch/forgetting_pool.py --config=configs/cifar10_msweep.py --root=DIR     # the paper's pool

trains every run of the config (its PERTURBATIONS x M_VALUES x SEEDS) with main.py in
ROOT/<p>-<m>-s<seed>, computes each run's sharpness, then writes ROOT/analysis/{figure2.png,
figure2.md, forgetting.csv, forgetting_runs.csv, results.md, results.csv}. Restartable: finished runs (results.json) and measured sharpness
(sharpness.json) are skipped, and an interrupted run resumes from its checkpoint.
`--dry_run` prints the commands. On a GPU host each main.py uses every local GPU; on a TPU pod
run the printed main.py commands with launch/tpu_pod.py.
"""

import argparse
import importlib
import itertools
import os
import subprocess
import sys
import time

if not __package__:  # `python launch/forgetting_pool.py`: the repository on sys.path, as for -m
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.common import REPO_ROOT  # noqa: E402
from launch.common import add_override_flag  # noqa: E402
from launch.common import csv_list  # noqa: E402
from launch.common import seed_range  # noqa: E402

POOLS = ("configs/digits_msweep.py", "configs/cifar10_msweep.py")


def pool_axes(config: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
  """The config's perturbations, m values and seeds (its PERTURBATIONS, M_VALUES and SEEDS)."""
  module = importlib.import_module(config.removesuffix(".py").replace("/", "."))
  return tuple(module.PERTURBATIONS), tuple(module.M_VALUES), tuple(module.SEEDS)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--root", required=True, help="one workdir per run is made under it")
  parser.add_argument("--config", choices=POOLS, default=POOLS[0], help="the pool's config file")
  parser.add_argument(
    "--perturbations", type=csv_list(str), help="comma separated (default: all of the config's)"
  )
  parser.add_argument(
    "--m", type=csv_list(int), help="comma separated (default: all of the config's)"
  )
  parser.add_argument(
    "--seeds", type=seed_range, help="e.g. 0-4 or 0,3 (default: the config's SEEDS)"
  )
  add_override_flag(parser, "config field=value for every run (e.g. num_epochs=2), repeatable")
  parser.add_argument("--num_permutations", type=int, default=10_000)
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv)
  perturbations, m_values, seeds = pool_axes(args.config)
  args.perturbations = args.perturbations or list(perturbations)
  args.m = args.m or list(m_values)
  args.seeds = list(seeds) if args.seeds is None else args.seeds

  def run(cmd):
    print("+", " ".join(cmd), flush=True)
    if args.dry_run:
      return
    code = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    if code:
      print(
        f"error: the command above failed (exit code {code}); run this again to resume",
        file=sys.stderr,
      )
      sys.exit(code)

  start = time.time()
  workdirs = []
  # Seed-major: a stopped pool has whole m sweeps of its first seeds.
  for seed, p, m in itertools.product(args.seeds, args.perturbations, args.m):
    workdir = os.path.join(os.path.abspath(args.root), f"{p}-{m}-s{seed}")
    workdirs.append(workdir)
    if not os.path.exists(os.path.join(workdir, "results.json")):
      config = [f"--config={args.config}:{p},{m}", f"--config.seed={seed}"]
      run([sys.executable, "main.py", *config, f"--workdir={workdir}"] + args.override)
    if not os.path.exists(os.path.join(workdir, "sharpness.json")):
      run([sys.executable, "-m", "pf_jax.analysis", "sharpness", f"--workdir={workdir}"])
  out = os.path.join(os.path.abspath(args.root), "analysis")
  run(
    [
      sys.executable,
      "-m",
      "pf_jax.analysis",
      "forgetting",
      "--out",
      out,
      f"--num_permutations={args.num_permutations}",
      "--workdirs",
      *workdirs,
    ]
  )
  run([sys.executable, "-m", "pf_jax.analysis", "report", "--out", out, "--workdirs", *workdirs])
  if not args.dry_run:
    print(f"pool of {len(workdirs)} runs done in {time.time() - start:.0f} s; see {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
