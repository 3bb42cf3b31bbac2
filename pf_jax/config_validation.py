"""Every config field's meaning and allowed values, and the check that applies them.

`FIELDS` is the one place where a field's allowed values are stated: `validate` checks them,
`main.py --help` prints them. Adding a field to `configs/common.py` means adding its line here
(a test compares the two). `validate` then checks the rules that involve several fields (step
counts, batch sizes against devices, rho range, image size against the model) and the SAM
library's own checks, reported under the config field the user typed.

Nothing here imports TensorFlow or compiles anything, so a bad value stops a run in about a
second with one line: `config.<field>: <value> — <what is allowed>`.
"""

import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import ml_collections

from pf_jax import dataset_catalog
from pf_jax import losses
from pf_jax import models
from pf_jax import optimizers
from pf_jax import perturbations
from pf_jax import reporting
from pf_jax import sam_family

DASH = "\u2014"


class ConfigError(ValueError):
  """One-line error naming the config field: `config.<field>: <value> — <allowed>`."""

  def __init__(self, field: str, value: Any, allowed: str):
    self.field = field
    super().__init__(f"config.{field}: {_show(value)} {DASH} {allowed}")


def _show(value) -> str:
  return repr(value) if isinstance(value, (str, tuple, list)) or value is None else str(value)


# -- Rules of single fields: `problem(value)` is None when allowed; `describe()` feeds --help. ---

Choices = Sequence[str] | Callable[[], Sequence[str]]


def _names(choices: Choices) -> tuple[str, ...]:
  return tuple(choices() if callable(choices) else choices)


@dataclasses.dataclass(frozen=True)
class Int:
  lo: int | None = None
  hi: int | None = None
  off: int | None = None  # a sentinel value that is also allowed (e.g. -1: derive it)
  off_means: str = ""

  def describe(self) -> str:
    if self.lo is not None and self.hi is not None:
      text = f"an integer in [{self.lo}, {self.hi}]"
    elif self.lo is not None:
      text = f"an integer >= {self.lo}"
    else:
      text = "an integer"
    return text if self.off is None else f"{self.off} ({self.off_means}) or {text}"

  def ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, int):
      return False
    return v == self.off or (
      (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)
    )


@dataclasses.dataclass(frozen=True)
class Float:
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  negative_means: str = ""  # any value < 0 is also allowed and means this

  def describe(self) -> str:
    if self.lo is not None and self.hi is not None:
      text = f"a number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
    elif self.lo is not None:
      text = f"a number {'>' if self.lo_open else '>='} {self.lo}"
    elif self.hi is not None:
      text = f"a number {'<' if self.hi_open else '<='} {self.hi}"
    else:
      text = "a finite number"
    return f"< 0 ({self.negative_means}) or {text}" if self.negative_means else text

  def ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    if self.negative_means and v < 0:
      return True
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))


@dataclasses.dataclass(frozen=True)
class Bool:
  def describe(self) -> str:
    return "True or False"

  def ok(self, v) -> bool:
    return isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Choice:
  choices: Choices

  def describe(self) -> str:
    return "one of " + ", ".join(repr(n) for n in _names(self.choices))

  def ok(self, v) -> bool:
    return isinstance(v, str) and v in _names(self.choices)


@dataclasses.dataclass(frozen=True)
class NameList:
  choices: Choices

  def describe(self) -> str:
    return "a non-empty tuple of " + ", ".join(repr(n) for n in _names(self.choices))

  def ok(self, v) -> bool:
    return (
      isinstance(v, (tuple, list))
      and len(v) > 0
      and all(isinstance(n, str) and n in _names(self.choices) for n in v)
    )


@dataclasses.dataclass(frozen=True)
class Text:
  optional: bool = False  # None allowed

  def describe(self) -> str:
    return "a path or None" if self.optional else "a string"

  def ok(self, v) -> bool:
    return isinstance(v, str) or (self.optional and v is None)


def _perturbations():
  return ("none",) + perturbations.OBJECTIVE_NAMES + ("obf",)


# field: (rule, meaning). One line each; --help prints them in this order.
FIELDS = {
  "seed": (
    Int(0, 2**31 - 1),
    "seed of the initialization, data order, augmentation and perturbations",
  ),
  "dataset": (Choice(dataset_catalog.training_datasets), "training dataset (TFDS)"),
  "data_dir": (
    Text(optional=True),
    "TFDS data directory; None: $TFDS_DATA_DIR or ~/tensorflow_datasets",
  ),
  "eval_datasets": (
    NameList(lambda: sorted(dataset_catalog.DATASETS)),
    "datasets evaluated on their test split",
  ),
  "image_size": (Int(1), "side of the square input images (a multiple of a ViT's patch size)"),
  "crop_area_min": (Float(0.0, 1.0, lo_open=True), "smallest area fraction of the Inception crop"),
  "image_normalization": (
    Choice(tuple(dataset_catalog.NORMALIZATIONS)),
    "pixel values: minus_one_to_one (p / 127.5 - 1) or imagenet (ImageNet mean / std)",
  ),
  "eval_image_size": (
    Int(1, off=-1, off_means="image_size"),
    "side of evaluation images (a ViT evaluates at its image_size)",
  ),
  "eval_interpolation": (
    Choice(dataset_catalog.INTERPOLATIONS),
    "resize method of evaluation (and forgetting) images",
  ),
  "shuffle_buffer": (Int(1), "shuffle buffer of streamed datasets (ImageNet)"),
  "model": (Choice(models.model_names), "model name (pf_jax/models)"),
  "head_bias_init": (Float(), "initial bias of the classification head"),
  "mixed_precision": (Bool(), "bfloat16 compute; parameters and optimizer stay float32"),
  "loss": (
    Choice(lambda: tuple(losses.LOSSES)),
    "softmax_xent (the paper's CE) or sigmoid_xent (BCE)",
  ),
  "label_smoothing": (Float(0.0, 1.0, hi_open=True), "label smoothing of the loss"),
  "global_batch_size": (Int(1), "examples per step over all devices"),
  "grad_accum_steps": (Int(1), "sequential micro-batches per step (the global batch is split)"),
  "num_epochs": (Float(0.0, lo_open=True), "training length in epochs (unless num_train_steps)"),
  "warmup_epochs": (Float(0.0), "linear learning-rate warmup in epochs (unless warmup_steps)"),
  "num_train_steps": (Int(1, off=-1, off_means="use num_epochs"), "training length in steps"),
  "warmup_steps": (Int(0, off=-1, off_means="use warmup_epochs"), "warmup length in steps"),
  "optimizer": (Choice(optimizers.CONFIG_NAMES), "base optimizer (decoupled weight decay)"),
  "lr_max": (Float(0.0, lo_open=True), "learning rate after warmup (then linear decay)"),
  "lr_min": (Float(0.0), "learning rate at the last step (<= lr_max)"),
  "weight_decay": (
    Float(0.0),
    "decoupled weight decay (not on biases, norms, position embeddings)",
  ),
  "momentum": (Float(0.0, 1.0, hi_open=True), "momentum of sgdw"),
  "b1": (Float(0.0, 1.0, hi_open=True), "first-moment decay of adamw"),
  "b2": (Float(0.0, 1.0, hi_open=True), "second-moment decay of adamw"),
  "clip_grad_norm": (Float(0.0), "global-norm clipping of the final (SAM) gradient; 0: off"),
  "shrink_perturb": (Float(0.0, 1.0), "shrink-and-perturb factor; 0: off"),
  "sam.perturbation": (Choice(_perturbations), "SAM perturbation; none: the base optimizer alone"),
  "sam.rho_max": (Float(0.0), "perturbation radius (the largest, with an lr-proportional rho)"),
  "sam.rho_min": (
    Float(0.0, negative_means="constant rho = rho_max"),
    "smallest radius of an lr-proportional rho (<= rho_max)",
  ),
  "sam.m": (Int(1), "perturbation batch size (each m-chunk has its own perturbation)"),
  "sam.chunk_mode": (
    Choice(sam_family.CHUNK_MODES),
    "a device's m-chunks: vmap together, scan in a loop, unroll written out, auto (unroll up to "
    "16 chunks, else scan)",
  ),
  "sam.obf_lambda": (Float(0.0, 1.0, hi_open=True), "OBF's lambda (the paper uses 1/C)"),
  "sam.obf_gamma": (Float(0.0, 1.0), "OBF's gamma"),
  "sam.obf_alpha": (
    Float(0.0, 1.0, negative_means="off: alpha from lambda and gamma"),
    "fixed OBF alpha (Table B.2)",
  ),
  "sam.obf_predictions": (
    Choice(perturbations.PREDICTIONS),
    "OBF's predictions p: per-class sigmoid (the authors' OBF, every paper run) or softmax",
  ),
  "sam.gsam_alpha": (Float(0.0, 1.0), "GSAM's xi; 0: SAM"),
  "sam.gsam_normalized_backup": (Bool(), "GSAM decomposes the normalized ascent direction"),
  "sam.asam": (
    Choice(("",) + sam_family.ASAM_MODES),
    "ASAM's operator: '' (off), before, after or both",
  ),
  "sam.asam_eta": (Float(0.0), "ASAM's eta added to |theta|"),
  "analysis.collect_every_steps": (
    Int(0),
    "record outputs at theta and theta^p every N steps; 0: off",
  ),
  "analysis.predictions": (
    Choice(perturbations.PREDICTIONS),
    "likelihoods binned by the forgetting analysis: softmax (Section 6.1) or per-class sigmoid",
  ),
  "analysis.dataset": (
    Choice(lambda: ("",) + tuple(sorted(dataset_catalog.DATASETS))),
    "dataset of the forgetting split; '': eval_datasets[0]",
  ),
  "analysis.max_raw_values": (Int(0), "store raw likelihoods when examples x classes <= this"),
  "analysis.sharpness_examples": (Int(1), "training examples for the Hessian's top eigenvalue"),
  "analysis.sharpness_batch_size": (Int(1), "batch size of the sharpness computation"),
  "analysis.sharpness_iters": (Int(1), "power iterations of the sharpness computation"),
  "analysis.sharpness_tol": (Float(0.0, lo_open=True), "relative tolerance of the power iteration"),
  "init_from": (
    Text(),
    "workdir, checkpoint directory or PyTorch .pth/.pth.tar (same model) to finetune from "
    "(head replaced); '': off",
  ),
  "log_every_steps": (Int(1), "steps between train log lines and summaries"),
  "eval_every_steps": (Int(1), "steps between evaluations (and at the end)"),
  "checkpoint_every_steps": (Int(1), "steps between checkpoints (and at the end)"),
  "keep_checkpoints": (Int(1), "checkpoints kept in the workdir"),
  "max_consecutive_nonfinite": (Int(1), "skipped non-finite steps in a row that stop the run"),
  "profile": (Bool(), "trace a few steps into the workdir (clu profiler)"),
  "eval_batch_size": (Int(1), "evaluation batch over all devices"),
}


def field_names(c: ml_collections.ConfigDict, prefix: str = "") -> list:
  """Dotted names of the leaves of `c`, in order."""
  out = []
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += field_names(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _get(c, field: str):
  for part in field.split("."):
    c = c[part]
  return c


def suggest(name: str, names: Sequence[str]) -> str:
  """' (did you mean x?)' for the closest of `names`, or ''."""
  close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
  if not close:  # a typo in the last part only: compare the leaf names
    leaves = {n.rsplit(".", 1)[-1]: n for n in names}
    close = [
      leaves[x] for x in difflib.get_close_matches(name.rsplit(".", 1)[-1], list(leaves), n=1)
    ]
  return f"; did you mean {close[0]}?" if close else ""


# -- Rules across fields. ------------------------------------------------------------------------


def schedule(c, num_train_examples: int) -> tuple[int, int, int]:
  """(total, warmup, steps per epoch): epochs become steps unless steps are given directly."""
  per_epoch = max(num_train_examples // c.global_batch_size, 1)
  total = c.num_train_steps if c.num_train_steps > 0 else int(c.num_epochs * per_epoch)
  warmup = c.warmup_steps if c.warmup_steps >= 0 else int(c.warmup_epochs * per_epoch)
  return total, warmup, per_epoch


def _check_schedule(c):
  # Counted with the catalog's training-set size: no data is read before the checks.
  total, warmup, per_epoch = schedule(c, dataset_catalog.DATASETS[c.dataset].train_examples)
  if total < 1:
    raise ConfigError(
      "num_epochs",
      c.num_epochs,
      f"at least one step: 1 epoch of {c.dataset} is {per_epoch} steps of {c.global_batch_size}",
    )
  if warmup > total:
    field = "warmup_steps" if c.warmup_steps >= 0 else "warmup_epochs"
    raise ConfigError(
      field,
      _get(c, field),
      f"at most the run's length: {warmup} warmup steps > "
      f"{total} steps" + ("" if c.warmup_steps >= 0 else " (or set warmup_steps)"),
    )
  if c.lr_min > c.lr_max:
    raise ConfigError("lr_min", c.lr_min, f"at most lr_max={c.lr_max}")


def _check_batches(c, num_devices: int, num_processes: int):
  if (
    c.global_batch_size % (num_devices * c.grad_accum_steps) or c.global_batch_size % num_processes
  ):
    raise ConfigError(
      "global_batch_size",
      c.global_batch_size,
      f"a multiple of devices ({num_devices}) x grad_accum_steps ({c.grad_accum_steps})"
      + (f" and of the {num_processes} processes" if num_processes > 1 else ""),
    )
  if c.eval_batch_size % num_devices or c.eval_batch_size % num_processes:
    raise ConfigError(
      "eval_batch_size",
      c.eval_batch_size,
      f"a multiple of the {reporting.plural(num_devices, 'device')}",
    )
  multiple = models.input_multiple(c.model)
  if c.image_size % multiple:
    raise ConfigError(
      "image_size", c.image_size, f"a multiple of {c.model}'s patch size {multiple}"
    )
  if multiple > 1 and c.eval_image_size not in (-1, c.image_size):
    raise ConfigError(
      "eval_image_size",
      c.eval_image_size,
      f"-1 or image_size ({c.image_size}): {c.model}'s position embeddings fix its input size",
    )


def _check_sam(c, num_devices: int):
  s = c.sam
  if s.perturbation == "none":
    for field, off in (("gsam_alpha", 0.0), ("asam", "")):
      if s[field] != off:
        raise ConfigError(
          f"sam.{field}",
          s[field],
          f"{off!r} when sam.perturbation is 'none' (GSAM and ASAM modify a perturbation)",
        )
    return
  per_device = c.global_batch_size // (num_devices * c.grad_accum_steps)
  m = s.m
  try:
    sam_family.chunking(m, per_device, num_devices)
  except ValueError:
    raise ConfigError(
      "sam.m",
      m,
      f"a divisor of the per-device micro-batch {per_device} (global batch "
      f"/ ({reporting.plural(num_devices, 'device')} x {c.grad_accum_steps} accumulation steps)) "
      f"or a multiple of it spanning a divisor of the {reporting.plural(num_devices, 'device')}",
    ) from None
  if s.rho_min >= 0:
    if s.rho_min > s.rho_max:
      raise ConfigError(
        "sam.rho_min", s.rho_min, f"at most sam.rho_max={s.rho_max} (or < 0: constant rho)"
      )
    if c.lr_max == c.lr_min:
      raise ConfigError(
        "sam.rho_min",
        s.rho_min,
        "< 0 (constant rho): an lr-proportional rho needs lr_max != lr_min",
      )
  # The SAM library's own checks, reported under the config field that feeds each argument.
  try:
    objective(c)
    sam_family.SamSpec(
      rho=s.rho_max,
      objective="steepest",
      m=m,
      chunk_mode=s.chunk_mode,
      gsam_alpha=s.gsam_alpha,
      asam=s.asam or None,
      asam_eta=s.asam_eta,
    )
  except ValueError as e:
    arg = str(e).split(" ", 1)[0]
    field = LIBRARY_ARGS.get(arg, "sam")
    raise ConfigError(field, _get(c, field) if field != "sam" else "", str(e)) from e


# Library argument (first word of its ValueError) -> the config field that sets it.
LIBRARY_ARGS = {
  "rho": "sam.rho_max",
  "m": "sam.m",
  "m=": "sam.m",
  "chunk_mode": "sam.chunk_mode",
  "gsam_alpha": "sam.gsam_alpha",
  "asam": "sam.asam",
  "asam_eta": "sam.asam_eta",
  "lam": "sam.obf_lambda",
  "gamma": "sam.obf_gamma",
  "alpha": "sam.obf_alpha",
  "perturbation": "sam.perturbation",
  "predictions": "sam.obf_predictions",
}


def objective(c):
  """The perturbation objective of `c` (a name or an OBF callable)."""
  s = c.sam
  return perturbations.get_objective(
    s.perturbation,
    lam=s.obf_lambda,
    gamma=s.obf_gamma,
    alpha=s.obf_alpha if s.obf_alpha >= 0 else None,
    predictions=s.obf_predictions,
  )


def _check_init_from(c):
  path = c.init_from
  if not path or "://" in path:
    return
  allowed = "a workdir or checkpoint directory that holds a checkpoint, or a .pth/.pth.tar file"
  if not os.path.exists(path):
    raise ConfigError("init_from", path, allowed + " (it does not exist)")
  if os.path.isfile(path) and path.endswith((".pth", ".pth.tar")):
    return
  # A checkpoint is a step-numbered folder in the workdir's checkpoints/ or the directory itself.
  sub = os.path.join(path, "checkpoints")
  directory = sub if os.path.isdir(sub) else path
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise ConfigError("init_from", path, allowed + f" (no step folder in {directory!r})")


def _check_analysis(c):
  """The forgetting split must share the training labels: OBF and its accuracy read them."""
  if not c.analysis.collect_every_steps:
    return
  from pf_jax.analysis import collect  # pylint: disable=g-import-not-at-top

  name = collect.forgetting_dataset(c)
  want = dataset_catalog.DATASETS[c.dataset].num_classes
  if dataset_catalog.DATASETS[name].num_classes != want:
    field = "analysis.dataset" if c.analysis.dataset else "eval_datasets"
    raise ConfigError(
      field,
      _get(c, field),
      f"a forgetting split with the {want} classes of "
      f"{c.dataset} ({name} has {dataset_catalog.DATASETS[name].num_classes}); "
      "set analysis.dataset",
    )


def validate(c: ml_collections.ConfigDict, num_devices: int = 1, num_processes: int = 1) -> None:
  """Raises ConfigError for the first field that is not allowed (unknown fields included)."""
  names = field_names(c)
  for name in names:
    if name not in FIELDS:
      raise ConfigError(name, _get(c, name), "unknown field" + suggest(name, list(FIELDS)))
  for name in FIELDS:
    if name not in names:
      raise ConfigError(
        name, None, "missing from the config (start from configs/common.base_config)"
      )
  for name, (rule, _) in FIELDS.items():
    if not rule.ok(_get(c, name)):
      raise ConfigError(name, _get(c, name), rule.describe())
  _check_schedule(c)
  _check_batches(c, num_devices, num_processes)
  _check_sam(c, num_devices)
  _check_init_from(c)
  _check_analysis(c)


def check_workdir(workdir: str, create: bool = True) -> None:
  """The workdir is (or can become) a writable directory, created unless `create` is False
  (--check_only); remote (gs://) paths are not checked."""
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    what = "is a file" if existing == path else f"is under {existing!r}, which is a file"
    raise WorkdirError(f"--workdir: {workdir!r} {DASH} a directory; it {what}")
  if not create:
    if not os.access(existing, os.W_OK | os.X_OK):
      raise WorkdirError(f"--workdir: {workdir!r} {DASH} a directory that can be written")
    return
  try:  # creating it is what the run does first anyway
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
      f"--workdir: {workdir!r} {DASH} a directory that can be created and written ({e.strerror})"
    ) from None


class WorkdirError(ValueError):
  """One-line error about --workdir."""


def help_text(c: ml_collections.ConfigDict) -> str:
  """One line per field: name, default (from `c`), meaning, allowed values."""
  lines = []
  for name, (rule, meaning) in FIELDS.items():
    default = _get(c, name) if name in field_names(c) else None
    lines.append(f"  --config.{name}={_show(default)}\n      {meaning}; {rule.describe()}")
  return "\n".join(lines)
