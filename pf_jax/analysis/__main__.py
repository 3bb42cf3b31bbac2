"""python -m pf_jax.analysis {sharpness,forgetting,report} ...: see each command's --help."""

import argparse
import os
import sys


def _quiet():
  """Only warnings and errors from libraries, as in main.py (pf_jax/process.py)."""
  from absl import logging  # pylint: disable=g-import-not-at-top

  from pf_jax import process  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  process.skip_absent_tpu()
  with process.quiet_native_stderr():  # TensorFlow's import announces oneDNN on fd 2
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  tensorflow.config.set_visible_devices([], "GPU")  # the analysis' TF reads data only


def build_parser() -> argparse.ArgumentParser:
  """The sub-commands and their options (each with a help line)."""
  parser = argparse.ArgumentParser(prog="python -m pf_jax.analysis", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser(
    "sharpness",
    help="dominant Hessian eigenvalue of a run's training loss "
    "at its latest checkpoint; prints sharpness=<value>, writes W/sharpness.json",
  )
  p.add_argument("--workdir", required=True, help="a finished run's workdir (main.py --workdir)")
  p.add_argument(
    "--num_examples",
    type=int,
    help="training examples for the Hessian (default: config.analysis.sharpness_examples)",
  )
  p.add_argument(
    "--batch_size",
    type=int,
    help="batch size of the Hessian-vector products (default: config.analysis.sharpness_batch_size)",
  )
  p.add_argument(
    "--num_iters",
    type=int,
    help="maximum power iterations (default: config.analysis.sharpness_iters)",
  )
  p.add_argument(
    "--tol",
    type=float,
    help="relative tolerance that stops the power iteration (default: config.analysis.sharpness_tol)",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the power iteration's start vector")
  p = sub.add_parser(
    "forgetting",
    help="Figure 2: DIR/forgetting_runs.csv (each run's measures), DIR/forgetting.csv (the "
    "taus), DIR/figure2.md (its tables) and DIR/figure2.png (panels of fewer than 4 runs are "
    "marked 'too few runs')",
  )
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument(
    "--workdirs",
    nargs="+",
    help="finished runs with collected outputs (config.analysis.collect_every_steps > 0)",
  )
  source.add_argument(
    "--runs_csv",
    help="a forgetting_runs.csv written before: the taus and figure again, without the runs",
  )
  p.add_argument("--out", required=True, help="output directory DIR (created)")
  p.add_argument(
    "--num_permutations",
    type=int,
    default=10_000,
    help="permutations of the p-value of each Kendall tau (default 10000)",
  )
  p.add_argument("--seed", type=int, default=0, help="seed of the permutations (default 0)")
  p = sub.add_parser("report", help="Table 1 layout: DIR/results.md and DIR/results.csv")
  p.add_argument("--workdirs", nargs="+", required=True, help="finished runs (any number)")
  p.add_argument("--out", required=True, help="output directory DIR (created)")
  p.add_argument(
    "--plots", action="store_true", help="also DIR/accuracy.png (error bars) and DIR/curves.png"
  )
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.command == "sharpness":
      from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

      workdir_lib.load_config(args.workdir)  # a wrong workdir is reported before TF starts
      _quiet()
      from pf_jax.analysis import sharpness  # pylint: disable=g-import-not-at-top

      result = sharpness.checkpoint_sharpness(
        args.workdir,
        num_examples=args.num_examples,
        batch_size=args.batch_size,
        num_iters=args.num_iters,
        tol=args.tol,
        seed=args.seed,
        log=lambda line: print(line, file=sys.stderr, flush=True),
      )
      print(f"sharpness={result['sharpness']:.6g}")
    elif args.command == "forgetting":
      from pf_jax.analysis import figure2  # pylint: disable=g-import-not-at-top

      kw = dict(num_permutations=args.num_permutations, seed=args.seed)
      if args.runs_csv:
        figure2.figure2_of_panels(figure2.read_runs_csv(args.runs_csv), args.out, **kw)
        names = ("forgetting.csv", "figure2.md", "figure2.png")
      else:
        figure2.figure2(args.workdirs, args.out, **kw)
        names = ("forgetting_runs.csv", "forgetting.csv", "figure2.md", "figure2.png")
      print("wrote " + ", ".join(os.path.join(args.out, n) for n in names))
    else:
      from pf_jax.analysis import report  # pylint: disable=g-import-not-at-top

      if args.plots:
        _quiet()  # TensorBoard's event reader may import TensorFlow: quietly, here
      print(report.report(args.workdirs, args.out, plots=args.plots), end="")
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
