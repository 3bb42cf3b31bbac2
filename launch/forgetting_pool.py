#!/usr/bin/env python3
"""Train Section 6.1's pool on digits, then its sharpness, Figure 2 and results table.

  python launch/forgetting_pool.py --root=/tmp/pool

trains every run of configs/digits_msweep.py (perturbations x m) with main.py in ROOT/<p>-<m>,
computes each run's sharpness, then writes ROOT/analysis/{figure2.png, forgetting.csv,
results.md, results.csv}. Restartable: finished runs (results.json) and measured sharpness
(sharpness.json) are skipped, and an interrupted run resumes from its checkpoint.
"""

import argparse
import os
import subprocess
import sys
import time

from common import override_to_flag  # launch/common.py (script dir is on sys.path)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/digits_msweep.py"
PERTURBATIONS = ("steep", "obf", "obf_gamma0")
M_VALUES = (1, 2, 4, 8, 16, 32, 64)


def _csv(kind):
  return lambda text: [kind(v) for v in text.split(",") if v]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--root", required=True, help="one workdir per run is made under it")
  parser.add_argument(
    "--perturbations",
    type=_csv(str),
    default=list(PERTURBATIONS),
    help="comma separated, of %(default)s",
  )
  parser.add_argument(
    "--m", type=_csv(int), default=list(M_VALUES), help="comma separated m values"
  )
  parser.add_argument(
    "--override",
    type=override_to_flag,
    action="append",
    default=[],
    help="config field=value for every run (e.g. num_epochs=2), repeatable",
  )
  parser.add_argument("--num_permutations", type=int, default=10_000)
  args = parser.parse_args(argv)

  def run(cmd):
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    if code:
      print(
        f"error: the command above failed (exit code {code}); run this again to resume",
        file=sys.stderr,
      )
      sys.exit(code)

  start = time.time()
  workdirs = []
  for p in args.perturbations:
    for m in args.m:
      workdir = os.path.join(os.path.abspath(args.root), f"{p}-{m}")
      workdirs.append(workdir)
      if not os.path.exists(os.path.join(workdir, "results.json")):
        run(
          [sys.executable, "main.py", f"--config={CONFIG}:{p},{m}", f"--workdir={workdir}"]
          + args.override
        )
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
  print(f"pool of {len(workdirs)} runs done in {time.time() - start:.0f} s; see {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
