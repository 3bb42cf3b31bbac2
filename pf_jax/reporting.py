"""What a run says on stderr: a start line, train lines with ETA, eval lines, checkpoints, a summary.

Which library logs reach stderr beside these lines is the process's concern (pf_jax/process.py).
"""

import os
import time

from absl import logging


def _seconds(seconds: float) -> str:
  return f"{seconds:.1f} s" if seconds < 60 else format_duration(seconds)


def format_duration(seconds: float) -> str:
  """'42 s' under a minute, '3 min 05 s' under an hour, else '2 h 07 min'."""
  s = int(round(seconds))
  if s < 60:
    return f"{s} s"
  if s < 3600:
    return f"{s // 60} min {s % 60:02d} s"
  return f"{s // 3600} h {s % 3600 // 60:02d} min"


def plural(n: int, noun: str) -> str:
  """'1 device', '8 devices'."""
  return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_method(config, num_devices: int, platform: str | None = None) -> str:
  """What is optimized, in words: perturbation, rho, m and its chunks, accumulation, loss.

  E.g. 'ASAM (after, eta 0.01) steepest ascent, rho 0.3 constant, m 32 (1 chunk per device,
  one chunk), no accumulation; loss softmax_xent; optimizer adamw (weight decay 0.1)'.
  `platform`: the devices the step runs on ("cpu", "tpu", ...), which `chunk_mode="auto"`
  resolves by; None: JAX's default backend.
  """
  from pf_jax import experiment  # pylint: disable=g-import-not-at-top  (jax only)
  from pf_jax import sam_family  # pylint: disable=g-import-not-at-top

  s = config.sam
  smoothing = f" (label smoothing {config.label_smoothing:g})" if config.label_smoothing else ""
  opt = f"optimizer {config.optimizer} (lr {config.lr_max:g} -> {config.lr_min:g}, weight decay {config.weight_decay:g})"
  accum = (
    f"accumulation over {config.grad_accum_steps} micro-batches"
    if config.grad_accum_steps > 1
    else "no accumulation"
  )
  tail = f"{accum}; loss {config.loss}{smoothing}; {opt}"
  if s.perturbation == "none":
    return f"no perturbation (plain {config.optimizer}), {tail}"
  if s.perturbation == "obf":
    if s.obf_alpha is not None:
      ascent = f"OBF (fixed alpha {s.obf_alpha:g})"
    else:
      ascent = f"OBF (lambda {s.obf_lambda:.4g}, gamma {s.obf_gamma:g})"
  else:
    ascent = {"steepest": "steepest ascent", "random": "random direction"}[s.perturbation]
  name = "SAM"
  if s.gsam_alpha:
    name = f"GSAM (xi {s.gsam_alpha:g}{', normalized backup' if s.gsam_normalized_backup else ''})"
  if s.asam != "none":
    name = f"A{name} ({s.asam}, eta {s.asam_eta:g})"
  if s.rho_min is not None:
    rho = f"rho {s.rho_max:g} -> {s.rho_min:g} (proportional to the lr)"
  else:
    rho = f"rho {s.rho_max:g} constant"
  per_device = experiment.per_device_batch(config, num_devices)
  n_chunks, group = sam_family.chunking(s.m, per_device, num_devices)
  if group > 1:
    chunks = f"one chunk spans {group} devices"
  else:
    if platform is None and s.chunk_mode == "auto":
      import jax  # pylint: disable=g-import-not-at-top

      platform = jax.default_backend()
    strategy = sam_family.chunk_strategy(s.chunk_mode, n_chunks, platform or "cpu")
    chunks = plural(n_chunks, "chunk") + " per device" + (f", {strategy}" if n_chunks > 1 else "")
  return f"{name} with {ascent}, {rho}, m {s.m} ({chunks}), {tail}"


def describe_run(
  config,
  num_devices: int,
  workdir: str | None,
  note: str | None = None,
  platform: str | None = None,
) -> str:
  """--check_only's lines: the resolved run (data, model, steps, batch), its method (chunks as
  they run on `platform`: `describe_method`), the workdir."""
  from pf_jax import dataset_catalog  # pylint: disable=g-import-not-at-top
  from pf_jax import experiment  # pylint: disable=g-import-not-at-top

  num_train = dataset_catalog.DATASETS[config.dataset].train_examples
  total, warmup, per_epoch = experiment.schedule(config, num_train)
  lines = [
    f"run: {config.model} on {config.dataset} ({num_train} train examples, {per_epoch} steps per epoch), "
    f"eval on {', '.join(config.eval_datasets)}; {total} steps (warmup {min(warmup, total)}), "
    f"global batch {config.global_batch_size} on {plural(num_devices, 'device')}, seed {config.seed}",
    f"method: {describe_method(config, num_devices, platform)}",
  ]
  if note:
    lines.append(f"note: {note}")
  if workdir:
    exists = os.path.isdir(os.path.join(workdir, "checkpoints"))
    state = "holds a run: it would be resumed" if exists else "a new run"
    lines.append(f"workdir: {workdir} ({state}; nothing created by --check_only)")
  return "\n".join(lines)


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
    # The steady rate (for the ETA): steps and seconds since the first step finished compiling,
    # evaluation excluded.
    self.steady_time, self.steady_step, self.paused = None, None, 0.0
    self.compile_time = None

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
    method: str = "",
    note: str | None = None,
    loaded: str | None = None,
  ):
    """`loaded`: what config.init_from gave (`pretrained.load`), or None."""
    evals = ", ".join(f"{k} {v}" for k, v in eval_sizes.items())
    resumed = f", resuming at step {self.start_step}" if self.start_step else ""
    self._info(
      "start: %s (%s parameters), %s %d train examples, eval on %s; %d steps (warmup %d)%s; "
      "%s%s; method: %s%s%s; workdir %s",
      model,
      _count(num_params),
      dataset,
      num_train,
      evals,
      self.total,
      warmup,
      resumed,
      plural(devices, "device"),
      f" ({processes} processes)" if processes > 1 else "",
      method,
      f"; {note}" if note else "",
      f"; {loaded}" if loaded else "",
      workdir,
    )

  def resumed(self, step: int, directory):
    self._info("resumed: step %d from %s", step, directory)

  def compiling(self):
    self._info("compiling the train step (the first step waits for it)")
    self.compile_start = time.time()

  def compiled(self, step: int):
    """The first step of this process is done: compilation included, so the rate starts here."""
    now = time.time()
    self.compile_time = now - self.compile_start
    self._info("compiled the train step and ran step %d in %s", step, _seconds(self.compile_time))
    self.last_time, self.last_step = now, step
    self.steady_time, self.steady_step, self.paused = now, step, 0.0

  def eta(self, step: int, now: float) -> str:
    """Remaining steps at the steady rate since compilation (evaluation time excluded)."""
    if self.steady_step is None or step <= self.steady_step:
      return "?"
    rate = (step - self.steady_step) / max(now - self.steady_time - self.paused, 1e-9)
    return format_duration((self.total - step) / rate)

  def train(self, step: int, summary: dict[str, float]) -> float:
    """Logs the train line; returns steps/s since the last one (evaluation time excluded)."""
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    eta = self.eta(step, now)
    rho = f" rho {summary['train/rho']:.3g}" if "train/rho" in summary else ""
    lr = f" lr {summary['train/lr']:.3g}" if "train/lr" in summary else ""
    top1 = f" top1 {summary['train/top1']:.4f}" if "train/top1" in summary else ""
    self._info(
      "train step %d/%d: loss %.4f%s%s%s, %.2f steps/s, ETA %s",
      step,
      self.total,
      summary["train/loss"],
      top1,
      lr,
      rho,
      rate,
      eta,
    )
    return rate

  def eval(self, step: int, results: dict[str, float], seconds: float):
    text = ", ".join(f"{k[len('eval/') :]} {v:.4f}" for k, v in sorted(results.items()))
    self._info("eval step %d: %s (%.1f s)", step, text, seconds)
    self.last_time += seconds  # evaluation time is not training speed
    self.paused += seconds

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
