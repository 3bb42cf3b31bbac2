"""Entry point: python main.py --config=configs/<name>.py[:arg] --workdir=<dir> [--config.x=v].

Without --config it trains the default (OBF-SAM ViT on scikit-learn's digits, no download).
`python main.py --help` lists every config field and the paper configs.

Order: command line and config -> validation (one-line errors, exit 2) -> TensorFlow, data and
compilation. A bad value therefore stops the run in about a second, before anything compiles.
"""

import contextlib
import difflib
import os
import signal
import sys
import threading
import traceback

PREEMPTED_EXIT_CODE = 75  # checkpointing.PREEMPTED_EXIT_CODE (this runs before any import of it)
_LOCK = None  # the workdir lock, released on every exit
_STDERR_FD = 2  # a duplicate of the original stderr: fd 2 is redirected while TensorFlow imports
_DISTRIBUTED = False  # several processes: after jax.distributed.initialize, JAX owns SIGTERM
_FORWARD_ONCE = threading.Lock()
_EXIT_ONCE = threading.Lock()  # the handler and the wake-up thread both see a signal: one line


def _exit_preempted(signum: int) -> None:
  """Outside the training loop a signal ends the run at once: before it nothing is trained yet (a
  restored state is in its checkpoint); after it the last checkpoint is saved. Exit 75: requeue.

  Several processes must stop together: once they are connected, SIGTERM is JAX's preemption
  notice (all checkpoint the step they agree on, then exit 75) and SIGINT is turned into it."""
  if _DISTRIBUTED and signum == signal.SIGINT:
    if _FORWARD_ONCE.acquire(blocking=False):
      os.write(_STDERR_FD, b"SIGINT: all processes checkpoint the step they agree on, then stop\n")
      os.kill(os.getpid(), signal.SIGTERM)
    return
  if not _EXIT_ONCE.acquire(blocking=False):
    return  # the other one is exiting
  if _LOCK is not None:
    _LOCK.release()
  os.write(
    _STDERR_FD,
    f"preempted ({signal.Signals(signum).name}) outside the training loop: nothing unsaved; "
    f"restart the same command to continue (exit code {PREEMPTED_EXIT_CODE})\n".encode(),
  )
  os._exit(PREEMPTED_EXIT_CODE)  # pylint: disable=protected-access


def _catch_signals_from_the_start() -> None:
  """SIGTERM/SIGINT exit 75 from the first second, also while the main thread is inside C++
  (data checks, restore, XLA compilation), where a Python handler would wait: the signal wakes a
  thread through `signal.set_wakeup_fd`. The training loop's `checkpointing.SignalCatcher`
  suspends this (it checkpoints first)."""
  global _STDERR_FD
  _STDERR_FD = os.dup(2)
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

  def watch():
    while True:
      data = os.read(read_fd, 1)
      if data and data[0] in (signal.SIGTERM, signal.SIGINT):
        _exit_preempted(data[0])

  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: _exit_preempted(signum))
  threading.Thread(target=watch, daemon=True, name="pf_jax_signals").start()


if __name__ == "__main__":
  _catch_signals_from_the_start()

# Library C++ logs (TensorFlow, XLA) are silenced unless asked for; this must precede their import.
_VERBOSE = any(
  a in ("--verbose", "--verbose=true", "--verbose=True") or a.startswith(("--verbosity", "-v="))
  for a in sys.argv[1:]
) or os.environ.get("PF_JAX_VERBOSE", "") not in ("", "0")
if not _VERBOSE:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from pf_jax import cli
from pf_jax import config_validation
from pf_jax import preflight
from pf_jax import reporting

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "config",
  None,
  "Config file, optionally with its argument: configs/<name>.py[:arg] "
  "(default: configs/default.py). Override fields with --config.<field>=<value>.",
)
flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, TensorBoard events, config.json and "
  "results.json (created; a run there is resumed).",
)
flags.DEFINE_bool(
  "verbose",
  False,
  "Full tracebacks for errors and every library's log messages "
  "(also: PF_JAX_VERBOSE=1; --verbosity=0 keeps the library logs only).",
)
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Continue the run in --workdir although its config "
  "differs from the stored config.json (the old one is kept as config.<N>.json).",
)
flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "jax.distributed.initialize(): 'auto' does it when a multi-host environment is "
  "detected (TPU pod, SLURM) or --coordinator_address is given.",
)
flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 (multi-process without auto-detection)."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool(
  "check_only",
  False,
  "Validate the command line and config (against --num_devices) "
  "and exit: what the launchers' --dry_run does.",
)
flags.DEFINE_string(
  "compile_for",
  None,
  "With --check_only: compile the run's programs for this TPU slice (v4-8, v5litepod-16, v3-32, "
  "...) on this machine, without a TPU (needs libtpu: pip install -e '.[tpu]'), and print each "
  "one's memory per chip, FLOPs and time bound; exit 2 if one does not fit.",
)
flags.DEFINE_integer(
  "num_devices",
  None,
  "With --check_only: the device count to check batch sizes "
  "and sam.m against (default: this machine's).",
)

_CONFIG = None  # the parsed config (set by parse_flags)
_NOTE = None  # what a `,local` variant is and changed (set by parse_flags)
DASH_ALLOWED = f"{config_validation.DASH} a directory for checkpoints and events (--workdir=DIR)"
_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def fail(message: str, code: int = 2):
  """Exits with `error: <message>` as the only line on stderr (the traceback with --verbose)."""
  if _VERBOSE and sys.exc_info()[0] is not None:
    traceback.print_exc()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def _flags_help() -> str:
  """main.py's own flags (absl's help lists every library's too)."""
  lines = FLAGS.module_help(sys.modules[__name__]).splitlines()
  return "\n".join(
    "  " + l if l else l for l in lines if l.strip() and not l.rstrip().endswith(":")
  )


def parse_flags(argv):
  """absl flags plus the config (cli.py); every problem is one `error:` line and exit 2."""
  global _CONFIG, _NOTE
  try:
    rest, overrides = cli.split_overrides(argv)
  except cli.UsageError as e:
    fail(str(e))
  if any(a in _HELP for a in rest[1:]):
    spec = next((a.split("=", 1)[1] for a in rest if a.startswith("--config=")), None)
    sys.stdout.write(cli.help_text(spec, _flags_help()))
    sys.exit(0)
  try:
    rest = FLAGS(rest)
  except flags.UnrecognizedFlagError as e:
    close = difflib.get_close_matches(e.flagname, list(FLAGS), n=1)
    hint = f"; did you mean --{close[0]}?" if close else ""
    fail(f"--{e.flagname}: unknown flag{hint} (python main.py --help lists them)")
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if len(rest) > 1:
    fail(f"{rest[1]!r}: unexpected argument (flags are written --name=value)")
  if FLAGS.workdir is None and not FLAGS.check_only:
    fail("--workdir: missing " + DASH_ALLOWED)
  try:
    _CONFIG = cli.build_config(FLAGS.config, overrides)
    _NOTE = cli.local_note(FLAGS.config, _CONFIG, overrides)
  except (cli.UsageError, config_validation.ConfigError) as e:
    fail(str(e))
  return rest


def _init_distributed():
  multihost_env = any(
    k in os.environ
    for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS")
  )
  if FLAGS.distributed == "off" or (
    FLAGS.distributed == "auto" and not multihost_env and not FLAGS.coordinator_address
  ):
    return
  global _DISTRIBUTED
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()
  _DISTRIBUTED = jax.process_count() > 1


def main(argv):
  del argv  # parse_flags has checked it
  reporting.skip_absent_tpu()
  if not (_VERBOSE or FLAGS.verbose or FLAGS["verbosity"].present):
    reporting.quiet_library_logs()
  if not (_VERBOSE or FLAGS.verbose):
    _drop_closed_loop_errors()
  if FLAGS.compile_for:  # pf_jax/tpu_compile.py
    from pf_jax import tpu_compile  # pylint: disable=g-import-not-at-top

    try:
      if not FLAGS.check_only:
        raise ValueError("--compile_for: only with --check_only (it compiles, it does not train)")
      sys.exit(tpu_compile.main(_CONFIG, FLAGS.compile_for, _NOTE))
    except ValueError as e:
      fail(str(e))
  if FLAGS.check_only:  # creates nothing
    num_devices = FLAGS.num_devices or jax.device_count()
    try:
      config_validation.validate(_CONFIG, num_devices, 1)
      if FLAGS.workdir:
        config_validation.check_workdir(FLAGS.workdir, create=False)
      checked = preflight.check(_CONFIG)  # init_from against the model, the data on disk
    except ValueError as e:
      fail(str(e))
    print("config OK")
    print("\n".join([reporting.describe_run(_CONFIG, num_devices, FLAGS.workdir, _NOTE), *checked]))
    return
  _init_distributed()
  created = preflight.first_missing(FLAGS.workdir)  # removed again if the run leaves it empty
  try:
    config_validation.validate(_CONFIG, jax.device_count(), jax.process_count())
    missing = preflight.missing_data(_CONFIG)  # before TensorFlow's import and the workdir
    if missing:
      raise ValueError(missing)
    config_validation.check_workdir(FLAGS.workdir)
  except ValueError as e:
    fail(str(e))
  if jax.process_index() == 0:  # tens of seconds on 2 cores: said, not silent (issue 30)
    logging.info("importing TensorFlow and the training system")
  with contextlib.nullcontext() if _VERBOSE or FLAGS.verbose else reporting.quiet_native_stderr():
    from pf_jax import checkpointing  # pylint: disable=g-import-not-at-top
    from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: after the checks)
    from pf_jax import train  # pylint: disable=g-import-not-at-top  (TensorFlow: after the checks)
    from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not (_VERBOSE or FLAGS.verbose):
    input_pipeline.tfds.disable_progress_bar()
  _lock_workdir(workdir_lib)
  try:
    _train(checkpointing, input_pipeline, train, workdir_lib)
  finally:
    _LOCK.release()
    preflight.remove_unused_workdir(created, FLAGS.workdir, workdir_lib.LOCK_FILE)


def _drop_closed_loop_errors():
  """After a failed save, tensorstore's callbacks into orbax's closed event loop print a traceback
  each (through sys.excepthook, or sys.unraisablehook from a C++ thread); the failure itself is
  one StorageError line."""
  closed = lambda kind, value: kind is RuntimeError and str(value) == "Event loop is closed"
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def drop_from_excepthook(kind, value, tb):
    if not closed(kind, value):
      excepthook(kind, value, tb)

  def drop_from_unraisablehook(unraisable):
    if not closed(unraisable.exc_type, unraisable.exc_value):
      unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = drop_from_excepthook, drop_from_unraisablehook


def _lock_workdir(workdir_lib):
  """Process 0 takes the workdir lock; the others wait for its decision (one line, exit 1)."""
  global _LOCK
  _LOCK = workdir_lib.WorkdirLock(FLAGS.workdir)
  error = ""
  if jax.process_index() == 0:
    try:
      _LOCK.acquire()
    except (workdir_lib.WorkdirLockedError, OSError) as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    if not multihost_utils.broadcast_one_to_all(not error) and not error:
      error = f"--workdir: {FLAGS.workdir} is in use (process 0 could not take its lock)"
  if error:
    fail(error, code=1)


def _train(checkpointing, input_pipeline, train, workdir_lib):
  preempted = None
  try:
    results = train.train_and_evaluate(
      _CONFIG, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change, note=_NOTE
    )
  except input_pipeline.DatasetNotPreparedError as e:
    fail(
      f"config.data_dir: {_CONFIG.data_dir!r} {config_validation.DASH} " + str(e).replace("\n", " ")
    )
  except (workdir_lib.ConfigMismatchError, workdir_lib.DamagedFileError) as e:  # one per field
    fail(str(e))
  except config_validation.ConfigError as e:  # found late, e.g. a config.init_from checkpoint
    fail(str(e))
  except (checkpointing.CheckpointError, checkpointing.NonFiniteError) as e:
    fail(str(e), code=1)
  except checkpointing.StorageError as e:  # orbax's threads may still fail: no interpreter teardown
    if _VERBOSE or FLAGS.verbose:
      traceback.print_exc()
    _LOCK.release()
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
  except checkpointing.Preempted as e:
    preempted = str(e)
  if preempted:  # outside `except`: the run's arrays are freed now, not in a slow teardown
    logging.warning("%s", preempted)
    sys.exit(checkpointing.PREEMPTED_EXIT_CODE)  # a distinct code: schedulers and launchers requeue
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
