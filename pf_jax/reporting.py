"""What a run says on stderr: a start line, train lines with ETA, eval lines, checkpoints, a summary.

By default (`quiet_library_logs`) only pf_jax's own INFO lines and everyone's warnings reach
stderr: orbax, clu and TensorFlow report internals at INFO (about 40 lines per checkpoint). The
absl `--verbosity` flag (or main.py's `--verbose`) keeps everything.
"""

import contextlib
import logging as std_logging
import os
import re
import tempfile
import time

from absl import logging

_OWN_DIRS = (
  os.path.dirname(os.path.abspath(__file__)),
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "main.py",
)


# Library warnings that are normal events here (TFDS when it builds `digits` the first time).
_EXPECTED_WARNINGS = ("has no dataset_info.json",)


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
  """Library INFO chatter off, short `HH:MM:SS message` lines (TF's C++ logs: see main.py)."""
  handler = logging.get_absl_handler()
  handler.addFilter(_OwnInfoOnly())
  handler.setFormatter(_ShortFormatter())
  logging.set_verbosity(logging.INFO)


# C++ INFO lines (glog/absl format) and absl's notice about them, written straight to fd 2.
_NATIVE_NOISE = re.compile(r"^(I\d{4} |WARNING: All log messages before absl::InitializeLog)")


@contextlib.contextmanager
def quiet_native_stderr():
  """Drops C++ INFO lines written to fd 2 inside the block (TensorFlow's import announces oneDNN;
  TF_CPP_MIN_LOG_LEVEL no longer silences it); other lines are written out afterwards."""
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


def format_duration(seconds: float) -> str:
  """'42 s' under a minute, '3 min 05 s' under an hour, else '2 h 07 min'."""
  s = int(round(seconds))
  if s < 60:
    return f"{s} s"
  if s < 3600:
    return f"{s // 60} min {s % 60:02d} s"
  return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _count(n: int) -> str:
  for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.1f}{unit}"
  return str(n)


class Reporter:
  """Log lines of one run (process 0 only); rates and ETA from the steps since the last line."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.total = total_steps
    self.enabled = enabled
    self.start_time = time.time()
    self.last_time, self.last_step = self.start_time, start_step
    self.start_step = start_step

  def _info(self, msg, *args):
    if self.enabled:
      logging.info(msg, *args)

  def start(
    self,
    model: str,
    num_params: int,
    dataset: str,
    num_train: int,
    eval_sizes: dict[str, int],
    warmup: int,
    devices: int,
    processes: int,
    workdir: str,
  ):
    evals = ", ".join(f"{k} {v}" for k, v in eval_sizes.items())
    resumed = f", resuming at step {self.start_step}" if self.start_step else ""
    self._info(
      "start: %s (%s parameters), %s %d train examples, eval on %s; %d steps (warmup %d)%s; "
      "devices %d%s; workdir %s",
      model,
      _count(num_params),
      dataset,
      num_train,
      evals,
      self.total,
      warmup,
      resumed,
      devices,
      f" ({processes} processes)" if processes > 1 else "",
      workdir,
    )

  def train(self, step: int, summary: dict[str, float]):
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    eta = format_duration((self.total - step) / rate) if rate > 0 else "?"
    rho = f" rho {summary['train/rho']:.3g}" if "train/rho" in summary else ""
    lr = f" lr {summary['train/lr']:.3g}" if "train/lr" in summary else ""
    self._info(
      "train step %d/%d: loss %.4f%s%s, %.2f steps/s, ETA %s",
      step,
      self.total,
      summary["train/loss"],
      lr,
      rho,
      rate,
      eta,
    )

  def eval(self, step: int, results: dict[str, float], seconds: float):
    text = ", ".join(f"{k[len('eval/') :]} {v:.4f}" for k, v in sorted(results.items()))
    self._info("eval step %d: %s (%.1f s)", step, text, seconds)
    self.last_time += seconds  # evaluation time is not training speed

  def checkpoint(self, step: int, directory: str):
    self._info("checkpoint step %d: %s", step, directory)

  def summary(self, step: int, results: dict[str, float], workdir: str, note: str | None = None):
    text = ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items()))
    trained = step - self.start_step
    self._info(
      "done: step %d (%d trained in %s)%s; %s; workdir %s",
      step,
      trained,
      format_duration(time.time() - self.start_time),
      f", {note}" if note else "",
      text,
      workdir,
    )
