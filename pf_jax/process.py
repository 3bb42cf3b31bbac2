"""The process around a run: exit codes, signals, distributed start-up, the workdir lock, and
which library logs reach stderr.

main.py calls `catch_signals_from_the_start` and `quiet_native_logs` before JAX's and
TensorFlow's imports (seconds), which this module does not import (nor does `import pf_jax`);
then, once the flags are parsed, `quiet_logs`, `init_distributed` and `lock_workdir`. The
training loop catches signals itself (`SignalCatcher`, it checkpoints first). Launchers that
train in their own process use `skip_absent_tpu` and `quiet_native_stderr`.

Logs: by default (`quiet_logs`) only pf_jax's own INFO lines and everyone's warnings reach
stderr: orbax, clu and TensorFlow report internals at INFO (about 40 lines per checkpoint). The
absl `--verbosity` flag (or main.py's `--verbose`) keeps everything.
"""

import contextlib
import logging as std_logging
import os
import re
import signal
import sys
import tempfile
import threading
import traceback

from absl import logging

# Exit codes: 0 the run finished (or --check_only found nothing wrong).
FAILED_EXIT_CODE = 1  # the run failed: a checkpoint, the storage, a workdir in use elsewhere
USAGE_EXIT_CODE = 2  # a bad command line, config, workdir or data: stopped before training
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, try again"

_lock = None  # the workdir lock (`lock_workdir`), released on every exit
_stderr_fd = 2  # a duplicate of the original stderr: fd 2 is redirected while TensorFlow imports
_distributed = False  # several processes: after jax.distributed.initialize, JAX owns SIGTERM
_verbose = False  # `quiet_native_logs`: --verbose, --verbosity or PF_JAX_VERBOSE asked for all
_forward_once = threading.Lock()
_exit_once = threading.Lock()  # the handler and the wake-up thread both see a signal: one line


def fail(message: str, code: int = USAGE_EXIT_CODE):
  """Exits with `error: <message>` as the only line on stderr (the traceback with --verbose)."""
  if _verbose and sys.exc_info()[0] is not None:
    traceback.print_exc()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def fail_at_once(message: str, verbose: bool):
  """`fail` with exit 1 and no interpreter teardown: orbax's threads may still fail after a
  failed save. The workdir lock is released first."""
  if verbose:
    traceback.print_exc()
  _lock.release()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  os._exit(FAILED_EXIT_CODE)  # pylint: disable=protected-access


# -- Signals. -------------------------------------------------------------------------------------


def _exit_preempted(signum: int) -> None:
  """Outside the training loop a signal ends the run at once: before it nothing is trained yet (a
  restored state is in its checkpoint); after it the last checkpoint is saved. Exit 75: requeue.

  Several processes must stop together: once they are connected, SIGTERM is JAX's preemption
  notice (all checkpoint the step they agree on, then exit 75) and SIGINT is turned into it."""
  if _distributed and signum == signal.SIGINT:
    if _forward_once.acquire(blocking=False):
      os.write(_stderr_fd, b"SIGINT: all processes checkpoint the step they agree on, then stop\n")
      os.kill(os.getpid(), signal.SIGTERM)
    return
  if not _exit_once.acquire(blocking=False):
    return  # the other one is exiting
  if _lock is not None:
    _lock.release()
  os.write(
    _stderr_fd,
    f"preempted ({signal.Signals(signum).name}) outside the training loop: nothing unsaved; "
    f"restart the same command to continue (exit code {PREEMPTED_EXIT_CODE})\n".encode(),
  )
  os._exit(PREEMPTED_EXIT_CODE)  # pylint: disable=protected-access


def catch_signals_from_the_start() -> None:
  """SIGTERM/SIGINT exit 75 from the first second, also while the main thread is inside C++
  (data checks, restore, XLA compilation), where a Python handler would wait: the signal wakes a
  thread through `signal.set_wakeup_fd`. The training loop's `SignalCatcher` suspends this (it
  checkpoints first)."""
  global _stderr_fd
  _stderr_fd = os.dup(2)
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


class SignalCatcher:
  """Turns SIGTERM/SIGINT into a flag read once per step (no work inside the handler).

  Only in single-process runs: with several processes JAX's preemption notifier owns SIGTERM and
  orbax's `reached_preemption` makes all processes stop at the same step. A second signal acts as
  it would without this catcher (the previous handler is restored on the first one).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous = {}
    self._wakeup_fd = -1

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    signal.signal(signum, self._previous.pop(signum, signal.SIG_DFL))
    logging.warning(
      "Received %s: checkpointing after the current step, then stopping "
      "(send it again to stop at once)",
      signal.Signals(signum).name,
    )

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top  (imported by the loop's caller already)

    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
      # catch_signals_from_the_start's watcher (exit 75 at once) wakes on this fd: off while we
      # checkpoint.
      self._wakeup_fd = signal.set_wakeup_fd(-1)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self._previous:
      signal.set_wakeup_fd(self._wakeup_fd, warn_on_full_buffer=False)
    self._previous = {}


# -- Several processes, one workdir. --------------------------------------------------------------


def init_distributed(mode: str, coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize() for `mode` 'on', or 'auto' in a multi-host environment (TPU
  pod, SLURM) or with a coordinator address (main.py's --distributed and the flags after it)."""
  import jax  # pylint: disable=g-import-not-at-top

  global _distributed
  multihost_env = any(
    k in os.environ
    for k in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "MEGASCALE_COORDINATOR_ADDRESS")
  )
  if mode == "off" or (mode == "auto" and not multihost_env and not coordinator_address):
    return
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  _distributed = jax.process_count() > 1


def lock_workdir(workdir: str) -> None:
  """Process 0 takes the workdir lock; the others wait for its decision (one line, exit 1). It is
  released by `release_workdir`, `fail_at_once` or a signal's exit."""
  import jax  # pylint: disable=g-import-not-at-top

  from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  global _lock
  _lock = workdir_lib.WorkdirLock(workdir)
  error = ""
  if jax.process_index() == 0:
    try:
      _lock.acquire()
    except (workdir_lib.WorkdirLockedError, OSError) as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    if not multihost_utils.broadcast_one_to_all(not error) and not error:
      error = f"--workdir: {workdir} is in use (process 0 could not take its lock)"
  if error:
    fail(error, code=FAILED_EXIT_CODE)


def release_workdir() -> None:
  _lock.release()


# -- Library logs. --------------------------------------------------------------------------------


def quiet_native_logs(argv: list[str]) -> None:
  """Library C++ logs (TensorFlow, XLA) off unless the command line or PF_JAX_VERBOSE asks for
  them (--verbose, --verbosity, -v=); before their import, which reads TF_CPP_MIN_LOG_LEVEL."""
  global _verbose
  _verbose = any(
    a in ("--verbose", "--verbose=true", "--verbose=True") or a.startswith(("--verbosity", "-v="))
    for a in argv[1:]
  ) or os.environ.get("PF_JAX_VERBOSE", "") not in ("", "0")
  if not _verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def quiet_logs(verbose: bool, keep_library_logs: bool) -> bool:
  """After the flags, before the first device query: no libtpu probing without a TPU; unless
  asked for (`verbose`: main.py's --verbose; `keep_library_logs`: absl's --verbosity), library
  INFO lines off and no tracebacks from orbax's closed event loop. Returns whether the run is
  verbose (full tracebacks, TensorFlow's native stderr, TFDS's progress bars)."""
  verbose = _verbose or verbose
  skip_absent_tpu()
  if not (verbose or keep_library_logs):
    quiet_library_logs()
  if not verbose:
    _drop_closed_loop_errors()
  return verbose


def skip_absent_tpu() -> None:
  """Where libtpu is installed (the `tpu` extra, for `--compile_for`) but the machine has neither
  TPU chips nor an NVIDIA GPU, JAX uses the CPU without asking libtpu, which would otherwise look
  for a TPU VM at the first device query and write errors to stderr. JAX_PLATFORMS, when set,
  decides instead. Call before the first device query."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  import jax  # pylint: disable=g-import-not-at-top

  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top

    accelerators = hardware_utils.num_available_tpu_chips_and_device_id()[0] or (
      hardware_utils.has_visible_nvidia_gpu()
    )
  except Exception:  # pylint: disable=broad-except  (a private module: leave JAX to decide)
    return
  if not accelerators:
    jax.config.update("jax_platforms", "cpu")


_OWN_DIRS = (
  os.path.dirname(os.path.abspath(__file__)),
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "main.py",
)
# Library warnings that are normal events here (TFDS when it builds `digits` the first time;
# orbax at a multi-process preemption, which our "Preempted at step N" line reports).
_EXPECTED_WARNINGS = ("has no dataset_info.json", "Reached preemption sync point")


class _OwnInfoOnly(std_logging.Filter):
  """Passes warnings and errors from anywhere, INFO only from pf_jax and main.py."""

  def filter(self, record):
    if record.pathname.startswith(_OWN_DIRS):
      return True
    if record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      return False  # a failed save: checkpointing.StorageError says it in one line
    return record.levelno >= std_logging.WARNING and not any(
      w in record.getMessage() for w in _EXPECTED_WARNINGS
    )


class _ShortFormatter(std_logging.Formatter):
  def format(self, record):
    level = "" if record.levelno < std_logging.WARNING else record.levelname + ": "
    return f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"


def quiet_library_logs() -> None:
  """Library INFO chatter off, short `HH:MM:SS message` lines (C++ logs: `quiet_native_logs`)."""
  handler = logging.get_absl_handler()
  handler.addFilter(_OwnInfoOnly())
  handler.setFormatter(_ShortFormatter())
  logging.set_verbosity(logging.INFO)


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


# C++ INFO lines (glog/absl format) and absl's notice about them, written straight to fd 2.
_NATIVE_NOISE = re.compile(r"^(I\d{4} |WARNING: All log messages before absl::InitializeLog)")


@contextlib.contextmanager
def quiet_native_stderr(quiet: bool = True):
  """Drops C++ INFO lines written to fd 2 inside the block (TensorFlow's import announces oneDNN;
  TF_CPP_MIN_LOG_LEVEL no longer silences it); other lines are written out afterwards. Does
  nothing unless `quiet`."""
  if not quiet:
    yield
    return
  with tempfile.TemporaryFile() as tmp:
    saved = os.dup(2)
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      kept = [
        l
        for l in tmp.read().decode(errors="replace").splitlines(True)
        if not _NATIVE_NOISE.match(l)
      ]
      if kept:
        os.write(2, "".join(kept).encode())
