"""Pieces shared by the launchers: flags, their parsing and the config check (stdlib only, so that
tpu_pod.py and local_gpu.py run from any Python)."""

import argparse
import os
import re
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def override_to_flag(text):
  """'sam.rho_max=0.1' (or 'config.sam.rho_max=0.1', '--config.sam.rho_max=0.1')."""
  field, sep, value = text.partition("=")
  field = field.strip()
  for prefix in ("--config.", "config."):
    if field.startswith(prefix):
      field = field[len(prefix) :]
  if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", field):
    raise argparse.ArgumentTypeError(
      f"--override expects field=value (e.g. sam.rho_max=0.1), got {text!r}"
    )
  return f"--config.{field}={value}"


def csv_list(kind):
  """An argparse type: 'a,b' -> [kind('a'), kind('b')] (empty items dropped)."""
  return lambda text: [kind(v) for v in text.split(",") if v]


def seed_range(text: str) -> list[int]:
  """'0-9' -> [0, ..., 9]; '3' -> [3]; '0-4,10-14' -> both ranges."""
  out = []
  for part in filter(None, text.split(",")):
    lo, _, hi = part.partition("-")
    out += range(int(lo), int(hi or lo) + 1)
  return out


def reject_unknown(parser, *checks) -> None:
  """Stops with argparse's usage error for any (name, values, allowed) with a value not allowed."""
  for name, values, allowed in checks:
    if unknown := sorted(set(values) - set(allowed)):
      parser.error(f"unknown {name} {unknown}; choose from {list(allowed)}")


def override_pairs(flags) -> list[tuple[str, str]]:
  """`--config.FIELD=VALUE` flags (add_override_flag's values) -> [(FIELD, VALUE)]."""
  return [tuple(f[len("--config.") :].split("=", 1)) for f in flags]


def add_run_flags(parser, example: str, workdir_help: str) -> None:
  """main.py's --config and --workdir, as every launcher of one run takes them."""
  parser.add_argument(
    "--config",
    required=True,
    help="Config file relative to the repo, with its arg, e.g. "
    f"{example} (main.py --help lists them).",
  )
  parser.add_argument("--workdir", required=True, help=workdir_help)


def add_check_flag(parser):
  parser.add_argument(
    "--no_check",
    action="store_true",
    help="Do not check the config with `main.py --check_only` first "
    "(needs pf_jax's requirements in the Python running this script).",
  )


def add_override_flag(parser, help_text: str) -> None:
  """The launchers' repeatable `--override FIELD=VALUE` (-> `--config.FIELD=VALUE` for main.py)."""
  parser.add_argument(
    "--override",
    type=override_to_flag,
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help=help_text,
  )


def check_config(config, override_flags, num_devices=None):
  """Checks the config as main.py will (`main.py --check_only`, this Python, on the CPU).

  Returns 0 if it is valid or cannot be checked here (a warning says why), else main.py's
  exit code after printing its one-line error.
  """
  cmd = [
    sys.executable,
    os.path.join(REPO_ROOT, "main.py"),
    "--check_only",
    f"--config={config}",
    *override_flags,
  ]
  if num_devices:
    cmd.append(f"--num_devices={num_devices}")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  try:
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    print(f"WARNING: config not checked: {e}", file=sys.stderr)
    return 0
  if r.returncode == 0:
    return 0
  last = (r.stderr.strip().splitlines() or [""])[-1]
  if last.startswith("error: "):
    print(last, file=sys.stderr)
    return r.returncode
  print(
    f"WARNING: config not checked ({sys.executable} cannot run main.py: {last}); "
    "install requirements.txt here, or pass --no_check",
    file=sys.stderr,
  )
  return 0
