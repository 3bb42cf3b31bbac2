#!/usr/bin/env python3
"""Run pf_jax's main.py on this machine's GPUs (single process, all visible GPUs).

Standard library only.  `--dry_run` prints the exact shell lines (cd, exports,
optional pip installs, main.py) that would run, so they can be pasted into a
shell; otherwise they are run with subprocess and main.py's exit code is
returned.
"""

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys

if not __package__:  # `python launch/local_gpu.py`: the repository on sys.path, as for -m
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.common import REPO_ROOT  # noqa: E402
from launch.common import add_check_flag  # noqa: E402
from launch.common import add_override_flag  # noqa: E402
from launch.common import add_run_flags  # noqa: E402
from launch.common import check_config  # noqa: E402

EXAMPLE = """\
example:
  python3 launch/local_gpu.py --gpus=0,1 --xla_mem_fraction=.9 \\
      --config=configs/resnet50_imagenet.py:sam_obf --workdir=/tmp/runs/sam01 \\
      --data_dir=$HOME/tensorflow_datasets --override sam.rho_max=0.05 --dry_run

  Every run (and --dry_run) first checks the config with `main.py --check_only`
  (the same one-line errors as main.py; --no_check skips it).  Try the tiny
  offline variant first: --config=configs/resnet50_imagenet.py:sam_obf,local

  Add --install once to pip install requirements.txt, "jax[cuda12]" and the
  repo (editable) into the python running this script (or --python).
"""


def gpu_list(text):
  text = text.replace(" ", "")
  if not re.fullmatch(r"[\w-]+(,[\w-]+)*", text):
    raise argparse.ArgumentTypeError(f"--gpus expects a comma separated list like 0,1 got {text!r}")
  return text


def mem_fraction(text):
  try:
    v = float(text)
  except ValueError:
    v = -1.0
  if not 0.0 < v <= 1.0:
    raise argparse.ArgumentTypeError(f"--xla_mem_fraction must be in (0, 1], got {text!r}")
  return text


def build_parser():
  p = argparse.ArgumentParser(
    prog="local_gpu.py",
    description=(
      "Run `main.py --config=... --workdir=...` on the local "
      "GPUs, optionally installing dependencies first."
    ),
    epilog=EXAMPLE,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  add_run_flags(p, "configs/resnet50_imagenet.py:sam_obf", "Checkpoint/log directory.")
  p.add_argument(
    "--gpus",
    type=gpu_list,
    default=None,
    help="GPU ids, e.g. 0,1 -> CUDA_VISIBLE_DEVICES=0,1 "
    "(default: inherit the environment, i.e. all GPUs).",
  )
  add_override_flag(p, "Config override, repeatable: sam.rho_max=0.1 -> --config.sam.rho_max=0.1.")
  p.add_argument("--data_dir", default=None, help="TFDS data dir, exported as TFDS_DATA_DIR.")
  p.add_argument(
    "--xla_mem_fraction",
    type=mem_fraction,
    default=None,
    help="Exported as XLA_PYTHON_CLIENT_MEM_FRACTION (e.g. .9).",
  )
  p.add_argument(
    "--install",
    action="store_true",
    help='First pip install -r requirements.txt "jax[cuda12]" and pip install -e .',
  )
  p.add_argument(
    "--python",
    default=sys.executable,
    help="Python executable to use (default: the one running this script, %(default)s).",
  )
  p.add_argument(
    "--dry_run",
    action="store_true",
    help="Check the config, print the env assignments and commands as shell lines and run nothing.",
  )
  add_check_flag(p)
  return p


def plan(args):
  """Returns (env dict, list of argv lists)."""
  env = {}
  if args.gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = args.gpus
  if args.data_dir is not None:
    env["TFDS_DATA_DIR"] = args.data_dir
  if args.xla_mem_fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = args.xla_mem_fraction
  cmds = []
  if args.install:
    cmds.append([args.python, "-m", "pip", "install", "-r", "requirements.txt", "jax[cuda12]"])
    cmds.append([args.python, "-m", "pip", "install", "-e", "."])
  cmds.append(
    [args.python, "main.py", f"--config={args.config}", f"--workdir={args.workdir}", *args.override]
  )
  return env, cmds


def _run_passing_on_signals(cmd, env) -> int:
  """Runs `cmd` and waits for it, also when we get SIGTERM (passed on) or SIGINT (ignored here).

  main.py checkpoints on SIGTERM/SIGINT and exits with 75 (preempted: requeue); killing it
  instead would lose the steps since its last checkpoint. Ctrl-C reaches the child directly (same
  process group), so SIGINT is not passed on (a second one would make it stop without saving).
  """
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
  previous = {
    signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)),
    signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
  }
  try:
    return proc.wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def main(argv=None):
  args = build_parser().parse_args(argv)
  if not args.no_check:
    gpus = len(args.gpus.split(",")) if args.gpus else None
    rc = check_config(args.config, args.override, num_devices=gpus)
    if rc:
      return rc
  env, cmds = plan(args)

  if args.dry_run:
    print(f"cd {shlex.quote(REPO_ROOT)}")
    for k, v in env.items():
      print(f"export {k}={shlex.quote(v)}")
    for cmd in cmds:
      print(shlex.join(cmd))
    return 0

  full_env = dict(os.environ, **env)
  for k, v in env.items():
    print(f"+ export {k}={shlex.quote(v)}", file=sys.stderr)
  for cmd in cmds:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    try:
      rc = _run_passing_on_signals(cmd, full_env)
    except OSError as e:
      print(f"ERROR: cannot run {cmd[0]}: {e}", file=sys.stderr)
      return 127
    if rc != 0:
      if cmd is not cmds[-1]:
        print(f"ERROR: exit code {rc}: {shlex.join(cmd)}", file=sys.stderr)
      # A child killed by a signal has rc < 0; report it like a shell does.
      return rc if rc > 0 else 128 - rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
