#!/usr/bin/env python3
"""Create (or reuse) a Cloud TPU VM and run pf_jax's main.py on every worker.

Standard library only, so it runs from any machine that has `gcloud` and `git`.

Steps (each one is a single command; `--dry_run` prints them all, one per line):
  a. gcloud compute tpus tpu-vm describe   -- does the TPU VM exist already?
  b. gcloud compute tpus tpu-vm create     -- only if it does not.
  c. git archive REF -> tarball; gcloud ... scp --worker=all; ssh --worker=all
     untars it into --repo_dir.  A `git archive` tarball rather than rsync:
     it ships exactly the committed source (no .git, venvs, checkpoints or
     caches), is one small file per worker, and needs nothing but gcloud's own
     scp (rsync would need per-worker ssh config for every pod host).
     Uncommitted changes are NOT shipped (a warning is printed if the tree is
     dirty); commit first, or pick another commit with --ref.
  d. ssh --worker=all: pip install -r requirements.txt "jax[tpu]" + pip install -e .
  e. ssh --worker=all: run main.py on all workers at once.  By default it is
     started in the background with nohup (output in --log_file on each
     worker), so a dropped laptop connection does not kill a multi-day run.
     --foreground instead runs it attached (ssh -t), streaming every worker's
     output; Ctrl-C then stops it on all workers.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

if not __package__:  # `python launch/tpu_pod.py`: the repository on sys.path, as for -m
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from launch.common import REPO_ROOT  # noqa: E402
from launch.common import add_check_flag  # noqa: E402
from launch.common import add_override_flag  # noqa: E402
from launch.common import add_run_flags  # noqa: E402
from launch.common import check_config  # noqa: E402

LIBTPU_URL = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
REMOTE_TARBALL = "pf_jax_src.tar.gz"  # relative to the remote home directory

EXAMPLE = """\
example:
  python3 launch/tpu_pod.py --name=pf-v3-32 --zone=europe-west4-a \\
      --accelerator_type=v3-32 --spot \\
      --config=configs/vit_s32_imagenet.py:sam_obf --workdir=gs://my-bucket/runs/sam01 \\
      --data_dir=gs://my-bucket/tensorflow_datasets \\
      --override sam.rho_max=0.3 --override num_epochs=200 --dry_run

  Every run (and --dry_run) first checks the config with `main.py --check_only`
  against the slice's device count (the same one-line errors as main.py;
  --no_check skips it). --compile_check also compiles the run for the slice
  here (`main.py --check_only --compile_for=v3-32`, libtpu needed) and stops
  if it does not fit in the chips' memory.

  Drop --dry_run to actually run it.  Follow the logs with
  gcloud compute tpus tpu-vm ssh pf-v3-32 --zone=europe-west4-a --worker=0 \\
      --command='tail -f ~/pf_jax.log'
  (a previous main.py still holding the TPU makes a new one fail: stop it
  first, e.g. --command='pkill -f main.py' on --worker=all)
"""


def warn(msg):
  print(f"WARNING: {msg}", file=sys.stderr)


def remote_quote(path):
  """shlex.quote, but keep a leading ~ / ~/ expandable on the remote side."""
  if path == "~":
    return '"$HOME"'
  if path.startswith("~/"):
    rest = path[2:]
    return '"$HOME"/' + shlex.quote(rest) if rest else '"$HOME"/'
  return shlex.quote(path)


def shell_assignment(kv):
  """KEY=VALUE -> KEY=<quoted VALUE> (quoting the whole word would turn the
  assignment into a command name)."""
  key, _, value = kv.partition("=")
  return f"{key}={shlex.quote(value)}"


def env_assignment(text):
  key, sep, _ = text.partition("=")
  if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
    raise argparse.ArgumentTypeError(f"--env expects KEY=VALUE, got {text!r}")
  return text


def tpu_name(text):
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", text):
    raise argparse.ArgumentTypeError(
      f"invalid TPU name {text!r}: lowercase letters, digits and '-', starting with a letter"
    )
  return text


def num_devices(accelerator_type):
  """JAX devices of a slice: v2/v3 count cores (1 device each), v4/v5p count
  TensorCores (2 per device), v5e/v6e count chips; None if unknown."""
  m = re.fullmatch(r"(v\d+[a-z]*?)(litepod)?-(\d+)", accelerator_type)
  if not m:
    return None
  n = int(m.group(3))
  return n // 2 if m.group(1) in ("v4", "v5p") else n


def is_multi_host(accelerator_type):
  """v2/v3/v4/v5p/v5e/v6e: more than 8 cores/chips means more than one host."""
  m = re.search(r"-(\d+)$", accelerator_type)
  return m is None or int(m.group(1)) > 8  # unknown format: assume a pod


def build_parser():
  p = argparse.ArgumentParser(
    prog="tpu_pod.py",
    description=(
      "Create or reuse a Cloud TPU VM (single host or pod), copy this repo "
      "to every worker (git archive + gcloud scp), install requirements "
      "and run `main.py --config=... --workdir=...` on all workers."
    ),
    epilog=EXAMPLE,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  tpu = p.add_argument_group("TPU VM")
  tpu.add_argument(
    "--name", required=True, type=tpu_name, help="TPU VM name (created if it does not exist)."
  )
  tpu.add_argument("--zone", required=True, help="e.g. us-central2-b.")
  tpu.add_argument(
    "--accelerator_type", required=True, help="e.g. v3-8, v3-32, v4-64, v5litepod-16."
  )
  tpu.add_argument(
    "--runtime_version",
    default="tpu-ubuntu2204-base",
    help="TPU VM software version (default: %(default)s).",
  )
  tpu.add_argument(
    "--project", default=None, help="GCP project (default: gcloud's configured project)."
  )
  cap = tpu.add_mutually_exclusive_group()
  cap.add_argument("--spot", action="store_true", help="Create a Spot TPU VM.")
  cap.add_argument("--preemptible", action="store_true", help="Create a preemptible TPU VM.")

  run = p.add_argument_group("run")
  add_run_flags(
    run, "configs/vit_s32_imagenet.py:sam_obf", "Checkpoints/logs dir; use gs://... on a pod."
  )
  run.add_argument(
    "--data_dir", default=None, help="TFDS data dir (gs://...), exported as TFDS_DATA_DIR."
  )
  add_override_flag(
    run, "Config override, repeatable: sam.rho_max=0.1 -> --config.sam.rho_max=0.1."
  )
  run.add_argument(
    "--env",
    action="append",
    default=[],
    type=env_assignment,
    metavar="KEY=VALUE",
    help="Extra environment variable for main.py (repeatable).",
  )
  run.add_argument(
    "--foreground",
    action="store_true",
    help="Run attached (ssh -t) instead of nohup in the background.",
  )
  run.add_argument(
    "--log_file",
    default="~/pf_jax.log",
    help="Remote log file in background mode (default: %(default)s).",
  )

  rem = p.add_argument_group("code / install")
  rem.add_argument(
    "--repo_dir", default="~/pf_jax", help="Remote directory for the code (default: %(default)s)."
  )
  rem.add_argument(
    "--ref", default="HEAD", help="Git commit/branch to ship (default: %(default)s)."
  )
  rem.add_argument(
    "--python", default="python3", help="Remote python executable (default: %(default)s)."
  )
  rem.add_argument("--skip_copy", action="store_true", help="Do not re-copy the code.")
  rem.add_argument("--skip_install", action="store_true", help="Do not re-run pip install.")
  p.add_argument(
    "--dry_run",
    action="store_true",
    help="Check the config, print every command, one per line, and run nothing.",
  )
  add_check_flag(p)
  p.add_argument(
    "--compile_check",
    action="store_true",
    help="Also compile the run's programs for --accelerator_type here, without a TPU "
    "(main.py --check_only --compile_for=TYPE: memory per chip, FLOPs, time bound; needs libtpu "
    "in this Python: pip install -e '.[tpu]'; minutes per program), and stop if one does not fit.",
  )
  return p


def compile_check(args):
  """`main.py --check_only --compile_for=<accelerator type>` (its lines shown); its exit code."""
  cmd = [
    sys.executable,
    os.path.join(REPO_ROOT, "main.py"),
    "--check_only",
    f"--compile_for={args.accelerator_type}",
    f"--config={args.config}",
    *args.override,
  ]
  return subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu")).returncode


class Commands:
  """Builds the argv lists; every user value goes through shlex.quote."""

  def __init__(self, args):
    self.a = args
    self.tarball = os.path.join(tempfile.gettempdir(), f"pf_jax_{args.name}.tar.gz")

  def _gcloud(self, verb, *extra):
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, self.a.name, f"--zone={self.a.zone}"]
    if self.a.project:
      cmd.append(f"--project={self.a.project}")
    return cmd + list(extra)

  def describe(self):
    return self._gcloud("describe", "--format=value(state,acceleratorType)")

  def create(self):
    cmd = self._gcloud(
      "create",
      f"--accelerator-type={self.a.accelerator_type}",
      f"--version={self.a.runtime_version}",
    )
    if self.a.spot:
      cmd.append("--spot")
    if self.a.preemptible:
      cmd.append("--preemptible")
    return cmd

  def ssh_all(self, remote_cmd, tty=False):
    extra = ["--worker=all"]
    if tty:
      extra.append("--ssh-flag=-t")
    return self._gcloud("ssh", *extra, f"--command={remote_cmd}")

  def archive(self):
    return [
      "git",
      "-C",
      REPO_ROOT,
      "archive",
      "--format=tar.gz",
      f"--output={self.tarball}",
      self.a.ref,
    ]

  def scp(self):
    cmd = [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      self.tarball,
      f"{self.a.name}:{REMOTE_TARBALL}",
      f"--zone={self.a.zone}",
    ]
    if self.a.project:
      cmd.append(f"--project={self.a.project}")
    return cmd + ["--worker=all"]

  def unpack(self):
    d = remote_quote(self.a.repo_dir)
    t = remote_quote("~/" + REMOTE_TARBALL)
    return self.ssh_all(f"mkdir -p {d} && tar -xzf {t} -C {d} && rm -f {t}")

  def install(self):
    py = shlex.quote(self.a.python)
    return self.ssh_all(
      f"cd {remote_quote(self.a.repo_dir)} && "
      f"{py} -m pip install -r requirements.txt {shlex.quote('jax[tpu]')} "
      f"-f {shlex.quote(LIBTPU_URL)} && {py} -m pip install -e ."
    )

  def train_argv(self):
    return [
      self.a.python,
      "main.py",
      f"--config={self.a.config}",
      f"--workdir={self.a.workdir}",
      *self.a.override,
    ]

  def run(self):
    env = []
    if self.a.data_dir:
      env.append(f"TFDS_DATA_DIR={self.a.data_dir}")
    env += self.a.env
    env_str = "".join(shell_assignment(e) + " " for e in env)
    main = shlex.join(self.train_argv())
    cd = f"cd {remote_quote(self.a.repo_dir)}"
    if self.a.foreground:
      return self.ssh_all(f"{cd} && {env_str}{main}", tty=True)
    log = remote_quote(self.a.log_file)
    # The background job owns its redirections, so ssh returns immediately.
    return self.ssh_all(
      f"{cd} && {{ {env_str}nohup {main} > {log} 2>&1 < /dev/null & }} && "
      f'echo started on "$(hostname)", log: {shlex.quote(self.a.log_file)}'
    )


def execute(cmd, **kwargs):
  print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
  return subprocess.run(cmd, **kwargs)


def check(cmd):
  rc = execute(cmd).returncode
  if rc != 0:
    print(f"ERROR: command failed with exit code {rc}: {shlex.join(cmd)}", file=sys.stderr)
    sys.exit(rc)


def validate(args):
  multi = is_multi_host(args.accelerator_type)
  if multi and not args.workdir.startswith("gs://"):
    warn(
      f"--workdir={args.workdir} is not a gs:// path; on a multi-host "
      f"pod ({args.accelerator_type}) every worker would write its own "
      "local copy. Use gs://bucket/..."
    )
  if multi and args.data_dir and not args.data_dir.startswith("gs://"):
    warn(f"--data_dir={args.data_dir} is not a gs:// path; it must exist on every worker.")
  cfg_file = args.config.split(":", 1)[0]
  if not os.path.isabs(cfg_file) and not os.path.exists(os.path.join(REPO_ROOT, cfg_file)):
    warn(f"config file {cfg_file} not found in {REPO_ROOT}")


def main(argv=None):
  args = build_parser().parse_args(argv)
  validate(args)
  if not args.no_check:
    rc = check_config(args.config, args.override, num_devices=num_devices(args.accelerator_type))
    if rc:
      return rc
  if args.compile_check:
    rc = compile_check(args)
    if rc:
      return rc
  c = Commands(args)

  if args.dry_run:
    print("dry run: assuming the TPU VM does not exist; nothing is executed.", file=sys.stderr)
    cmds = [c.describe(), c.create()]
    if not args.skip_copy:
      cmds += [c.archive(), c.scp(), c.unpack()]
    if not args.skip_install:
      cmds.append(c.install())
    cmds.append(c.run())
    for cmd in cmds:
      print(shlex.join(cmd))
    return 0

  # (a) exists?
  desc = execute(c.describe(), capture_output=True, text=True)
  if desc.returncode == 0:
    fields = desc.stdout.split()
    state = fields[0] if fields else "?"
    acc = fields[1].rsplit("/", 1)[-1] if len(fields) > 1 else "?"
    print(f"TPU VM {args.name} exists (state={state}, type={acc}); reusing it.", file=sys.stderr)
    if acc not in ("?", args.accelerator_type):
      warn(
        f"existing TPU VM is {acc}, not --accelerator_type="
        f"{args.accelerator_type}; delete it to change the type."
      )
    if state in ("PREEMPTED", "TERMINATED", "STOPPED"):
      warn(
        f"TPU VM state is {state}; delete it (gcloud compute tpus tpu-vm "
        "delete) and re-run to recreate it."
      )
  else:
    err = (desc.stderr or "").strip()
    if err and "not found" not in err.lower() and "NOT_FOUND" not in err:
      warn(f"describe failed: {err}")
    # (b) create
    check(c.create())

  # (c) copy
  if not args.skip_copy:
    dirty = subprocess.run(
      ["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
      capture_output=True,
      text=True,
    )
    if dirty.returncode == 0 and dirty.stdout.strip():
      warn(f"uncommitted changes are NOT shipped (git archive {args.ref}).")
    try:
      check(c.archive())
      check(c.scp())
    finally:
      if os.path.exists(c.tarball):
        os.remove(c.tarball)
    check(c.unpack())
  # (d) install
  if not args.skip_install:
    check(c.install())
  # (e) run
  rc = execute(c.run()).returncode
  if rc == 0 and not args.foreground:
    print(
      "Started. Follow worker 0 with:\n  "
      + shlex.join(
        c._gcloud("ssh", "--worker=0", f"--command=tail -f {remote_quote(args.log_file)}")
      ),
      file=sys.stderr,
    )
  return rc


if __name__ == "__main__":
  sys.exit(main())
