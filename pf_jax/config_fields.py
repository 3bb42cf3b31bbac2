"""Every config field, declared once: default, allowed values, meaning, workdir rule, library use.

`FIELDS` is the only place a field is written down. Everything else is derived from it:

- `defaults()`: the base ConfigDict that the files in `configs/` start from;
- `help_text()`: `python main.py --help`;
- `config_validation.validate`: each field's allowed values (the rules below) and its one-line
  error `config.<field>: <value> — <what is allowed>`;
- `SAFE_TO_CHANGE`: the fields a run may continue with changed values (`workdir.check_config`;
  the analysis pool's experiment identity);
- `library_kwargs(config, "SamSpec")`: the keyword arguments a library function receives from the
  config (`experiment.build`), and `field_for("SamSpec", "m")`, the field that feeds an argument
  (a library `errors.ArgumentError` is reported under it).

An option that can be switched off is None (or the named choice "none") when off, never a number
with a special meaning. Nothing here imports TensorFlow or JAX's device runtime.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import ml_collections

from pf_jax import dataset_catalog
from pf_jax import losses
from pf_jax import models
from pf_jax import perturbations
from pf_jax import sam_family

# -- Allowed values: `ok(value)` and `describe()` (for errors and --help). ----------------------

Choices = Sequence[str] | Callable[[], Sequence[str]]


def _names(choices: Choices) -> tuple[str, ...]:
  return tuple(choices() if callable(choices) else choices)


@dataclasses.dataclass(frozen=True)
class Int:
  lo: int | None = None
  hi: int | None = None
  type = int

  def describe(self) -> str:
    if self.lo is not None and self.hi is not None:
      return f"an integer in [{self.lo}, {self.hi}]"
    return f"an integer >= {self.lo}" if self.lo is not None else "an integer"

  def ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, int):
      return False
    return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)


@dataclasses.dataclass(frozen=True)
class Float:
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  type = float

  def describe(self) -> str:
    if self.lo is not None and self.hi is not None:
      left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
      return f"a number in {left}{self.lo}, {self.hi}{right}"
    if self.lo is not None:
      return f"a number {'>' if self.lo_open else '>='} {self.lo}"
    if self.hi is not None:
      return f"a number {'<' if self.hi_open else '<='} {self.hi}"
    return "a finite number"

  def ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
      return False
    return self.hi is None or not (v > self.hi or (self.hi_open and v == self.hi))


@dataclasses.dataclass(frozen=True)
class Bool:
  type = bool

  def describe(self) -> str:
    return "True or False"

  def ok(self, v) -> bool:
    return isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Choice:
  choices: Choices
  type = str

  def describe(self) -> str:
    return "one of " + ", ".join(repr(n) for n in _names(self.choices))

  def ok(self, v) -> bool:
    return isinstance(v, str) and v in _names(self.choices)


@dataclasses.dataclass(frozen=True)
class NameList:
  choices: Choices
  type = tuple

  def describe(self) -> str:
    return "a non-empty tuple of " + ", ".join(repr(n) for n in _names(self.choices))

  def ok(self, v) -> bool:
    return (
      isinstance(v, (tuple, list))
      and len(v) > 0
      and all(isinstance(n, str) and n in _names(self.choices) for n in v)
    )


@dataclasses.dataclass(frozen=True)
class Path:
  type = str

  def describe(self) -> str:
    return "a non-empty path"

  def ok(self, v) -> bool:
    return isinstance(v, str) and v != ""


Rule = Int | Float | Bool | Choice | NameList | Path


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field.

  Attributes:
    name: dotted name, e.g. "sam.m" (`--config.sam.m=...`).
    default: value in `defaults()`.
    rule: the allowed values.
    meaning: one line for --help.
    none: when set, None is also allowed and means this (an option that is off).
    safe: may change in an existing workdir (it does not change what is trained).
    args: the library arguments it becomes, as "function.argument".
  """

  name: str
  default: Any
  rule: Rule
  meaning: str
  none: str = ""
  safe: bool = False
  args: tuple[str, ...] = ()

  def ok(self, value) -> bool:
    return (value is None and bool(self.none)) or self.rule.ok(value)

  def describe(self) -> str:
    return f"None ({self.none}) or {self.rule.describe()}" if self.none else self.rule.describe()


def _perturbations():
  return ("none",) + perturbations.OBJECTIVE_NAMES + ("obf",)


def _all_datasets():
  return tuple(sorted(dataset_catalog.DATASETS))


F = Field
UNIT_OPEN = Float(0.0, 1.0, hi_open=True)
# --help prints them in this order.
# fmt: off
FIELDS: tuple[Field, ...] = (
  F("seed", 0, Int(0, 2**31 - 1), "seed of the initialization, data order, augmentation and perturbations"),
  # Data (pf_jax/input_pipeline.py).
  F("dataset", "digits", Choice(dataset_catalog.training_datasets), "training dataset (TFDS)"),
  F("data_dir", None, Path(), "TFDS data directory", none="$TFDS_DATA_DIR or ~/tensorflow_datasets", safe=True),
  F("eval_datasets", ("digits",), NameList(_all_datasets), "datasets evaluated on their test split", safe=True),
  F("image_size", 8, Int(1), "side of the square input images (a multiple of a ViT's patch size)"),
  F("image_normalization", "minus_one_to_one", Choice(lambda: tuple(dataset_catalog.NORMALIZATIONS)), "pixel values: minus_one_to_one (p / 127.5 - 1) or imagenet (ImageNet mean / std)"),
  F("eval_image_size", None, Int(1), "side of evaluation images (a ViT evaluates at its image_size)", none="image_size"),
  F("eval_interpolation", "bilinear", Choice(lambda: tuple(dataset_catalog.INTERPOLATIONS)), "resize method of evaluation (and forgetting) images"),
  F("crop_area_min", 0.08, Float(0.0, 1.0, lo_open=True), "smallest area fraction of the Inception crop"),
  F("shuffle_buffer", 50_000, Int(1), "shuffle buffer of streamed datasets (ImageNet)"),
  # Model (pf_jax/models).
  F("model", "vit_digits", Choice(models.model_names), "model name (pf_jax/models)"),
  F("head_bias_init", 0.0, Float(), "initial bias of the classification head", args=("build_model.head_bias_init",)),
  F("mixed_precision", False, Bool(), "bfloat16 compute; parameters and optimizer stay float32"),
  F("init_from", None, Path(), "workdir, checkpoint directory or PyTorch .pth/.pth.tar (same model) to finetune from (head replaced)", none="train from scratch"),
  # Loss (pf_jax/losses.py).
  F("loss", "softmax_xent", Choice(lambda: tuple(losses.LOSSES)), "softmax_xent (the paper's CE) or sigmoid_xent (BCE)"),
  F("label_smoothing", 0.0, UNIT_OPEN, "label smoothing of the loss", args=("get_loss.label_smoothing",)),
  # Length and batches: epochs become steps with the training split's size.
  F("global_batch_size", 128, Int(1), "examples per step over all devices"),
  F("grad_accum_steps", 1, Int(1), "sequential micro-batches per step (the global batch is split)"),
  F("num_epochs", 10.0, Float(0.0, lo_open=True), "training length in epochs (unless num_train_steps)"),
  F("warmup_epochs", 1.0, Float(0.0), "linear learning-rate warmup in epochs (unless warmup_steps)"),
  F("num_train_steps", None, Int(1), "training length in steps", none="from num_epochs"),
  F("warmup_steps", None, Int(0), "warmup length in steps", none="from warmup_epochs"),
  # Base optimizer (pf_jax/optimizers.py, pf_jax/schedules.py): linear warmup, then linear decay.
  F("optimizer", "adamw", Choice(("adamw", "sgdw")), "base optimizer (decoupled weight decay)"),
  F("lr_max", 1e-3, Float(0.0, lo_open=True), "learning rate after warmup (then linear decay)", args=("warmup_linear_decay.lr_max", "lr_proportional_rho.lr_max", "shrink_and_perturb.lr_max")),
  F("lr_min", 0.0, Float(0.0), "learning rate at the last step (<= lr_max)", args=("warmup_linear_decay.lr_min", "lr_proportional_rho.lr_min")),
  F("weight_decay", 0.0, Float(0.0), "decoupled weight decay (not on biases, norms, position embeddings)", args=("adamw.weight_decay", "sgdw.weight_decay")),
  F("momentum", 0.9, UNIT_OPEN, "momentum of sgdw", args=("sgdw.momentum",)),
  F("b1", 0.9, UNIT_OPEN, "first-moment decay of adamw", args=("adamw.b1",)),
  F("b2", 0.999, UNIT_OPEN, "second-moment decay of adamw", args=("adamw.b2",)),
  F("clip_grad_norm", None, Float(0.0, lo_open=True), "global-norm clipping of the final (SAM) gradient", none="no clipping", args=("clip_by_global_norm.max_norm",)),
  F("shrink_perturb", None, Float(0.0, 1.0, lo_open=True), "shrink-and-perturb factor", none="off", args=("shrink_and_perturb.factor",)),
  # SAM family (pf_jax/sam_family.py, pf_jax/perturbations.py).
  F("sam.perturbation", "none", Choice(_perturbations), "SAM perturbation; none: the base optimizer alone"),
  F("sam.rho_max", 0.0, Float(0.0), "perturbation radius (the largest, with an lr-proportional rho)", args=("SamSpec.rho", "lr_proportional_rho.rho_max")),
  F("sam.rho_min", None, Float(0.0), "smallest radius of an lr-proportional rho (<= rho_max)", none="constant rho = rho_max", args=("lr_proportional_rho.rho_min",)),
  F("sam.m", 64, Int(1), "perturbation batch size (each m-chunk has its own perturbation)", args=("SamSpec.m",)),
  F(
    "sam.chunk_mode",
    "auto",
    Choice(sam_family.CHUNK_MODES),
    "a device's m-chunks: vmap together, scan in a loop, unroll written out, auto (unroll up to "
    "16 chunks, else scan)",
    args=("SamSpec.chunk_mode",),
  ),
  F("sam.obf_lambda", 0.0, UNIT_OPEN, "OBF's lambda (the paper uses 1/C)", args=("obf.lam",)),
  F("sam.obf_gamma", 1.0, Float(0.0, 1.0), "OBF's gamma", args=("obf.gamma",)),
  F("sam.obf_alpha", None, Float(0.0, 1.0), "fixed OBF alpha (Table B.2)", none="alpha from lambda and gamma", args=("obf_fixed_alpha.alpha",)),
  F("sam.obf_predictions", "sigmoid", Choice(perturbations.PREDICTIONS), "OBF's predictions p: per-class sigmoid (the authors' OBF, every paper run) or softmax", args=("obf.predictions", "obf_fixed_alpha.predictions")),
  F("sam.gsam_alpha", 0.0, Float(0.0, 1.0), "GSAM's xi; 0: SAM", args=("SamSpec.gsam_alpha",)),
  F("sam.gsam_normalized_backup", False, Bool(), "GSAM decomposes the normalized ascent direction", args=("SamSpec.gsam_normalized_backup",)),
  F("sam.asam", "none", Choice(("none",) + sam_family.ASAM_MODES), "ASAM's operator: none (off), before, after or both", args=("SamSpec.asam",)),
  F("sam.asam_eta", 0.0, Float(0.0), "ASAM's eta added to |theta|", args=("SamSpec.asam_eta",)),
  # Analysis (pf_jax/analysis): they only read the run.
  F("analysis.collect_every_steps", None, Int(1), "record outputs at theta and theta^p every N steps", none="off", safe=True),
  F("analysis.predictions", "softmax", Choice(perturbations.PREDICTIONS), "likelihoods binned by the forgetting analysis: softmax (Section 6.1) or per-class sigmoid"),
  F("analysis.dataset", None, Choice(_all_datasets), "dataset of the forgetting split", none="eval_datasets[0]", safe=True),
  F("analysis.max_raw_values", 1_000_000, Int(0), "store raw likelihoods when examples x classes <= this", safe=True),
  F("analysis.sharpness_examples", 2048, Int(1), "training examples for the Hessian's top eigenvalue", safe=True),
  F("analysis.sharpness_batch_size", 256, Int(1), "batch size of the sharpness computation", safe=True),
  F("analysis.sharpness_iters", 100, Int(1), "power iterations of the sharpness computation", safe=True),
  F("analysis.sharpness_tol", 1e-4, Float(0.0, lo_open=True), "relative tolerance of the power iteration", safe=True),
  # The loop (pf_jax/train.py).
  F("log_every_steps", 50, Int(1), "steps between train log lines and summaries", safe=True),
  F("eval_every_steps", 500, Int(1), "steps between evaluations (and at the end)", safe=True),
  F("checkpoint_every_steps", 500, Int(1), "steps between checkpoints (and at the end)", safe=True),
  F("keep_checkpoints", 3, Int(1), "checkpoints kept in the workdir", safe=True, args=("CheckpointManagerOptions.max_to_keep",)),
  F("max_consecutive_nonfinite", 10, Int(1), "skipped non-finite steps in a row that stop the run", safe=True),
  F("profile", False, Bool(), "trace a few steps into the workdir (clu profiler)", safe=True),
  F("eval_batch_size", 512, Int(1), "evaluation batch over all devices", safe=True),
)
# fmt: on
del F

BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
NAMES: tuple[str, ...] = tuple(BY_NAME)
SAFE_TO_CHANGE: tuple[str, ...] = tuple(f.name for f in FIELDS if f.safe)
# "function.argument" -> the field that feeds it (each argument has one field).
_BY_ARG: dict[str, str] = {arg: f.name for f in FIELDS for arg in f.args}
assert len(_BY_ARG) == sum(len(f.args) for f in FIELDS), "a library argument declared twice"


def defaults() -> ml_collections.ConfigDict:
  """The base config: every field at its default (fields that may be None keep their type)."""
  c = ml_collections.ConfigDict()
  for f in FIELDS:
    *groups, leaf = f.name.split(".")
    holder = c
    for g in groups:
      if g not in holder:
        holder[g] = ml_collections.ConfigDict()
      holder = holder[g]
    value = f.default
    if f.none:  # typed, so that `--config.x=0.5` parses as the field's type
      value = ml_collections.FieldReference(value, field_type=f.rule.type)
    holder[leaf] = value
  return c


def get(config, name: str):
  """The value of dotted field `name` in `config` (a ConfigDict or a nested dict)."""
  for part in name.split("."):
    config = config[part]
  return config


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of the leaves of `config`, in order."""
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += field_names(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def _library_value(field: Field, value):
  # A named choice "none" is the library's None.
  return None if isinstance(field.rule, Choice) and value == "none" else value


def library_kwargs(config, function: str) -> dict[str, Any]:
  """Keyword arguments of library `function` set by `config`, as declared in `FIELDS`.

  Args:
    c: a config.
    function: a function or class named in the fields' `args`, e.g. "SamSpec", "adamw".

  Returns:
    {argument: value} for every declared "function.argument".

  Example: `library_kwargs(c, "adamw")` -> `{"weight_decay": 0.05, "b1": 0.9, "b2": 0.999}`.
  """
  out = {}
  for arg, name in _BY_ARG.items():
    fn, _, argument = arg.partition(".")
    if fn == function:
      out[argument] = _library_value(BY_NAME[name], get(config, name))
  return out


def field_for(function: str, arg: str) -> str | None:
  """The config field that feeds library argument `function(arg=)`, or None."""
  return _BY_ARG.get(f"{function}.{arg}")


def show(value) -> str:
  """A value as errors and --help print it."""
  return repr(value) if isinstance(value, (str, tuple, list)) or value is None else str(value)


def help_text(config: ml_collections.ConfigDict) -> str:
  """One entry per field: `--config.name=<value in c>`, its meaning and allowed values."""
  lines = []
  for f in FIELDS:
    try:
      value = get(config, f.name)
    except (KeyError, AttributeError):
      value = f.default
    safe = " (may change in an existing workdir)" if f.safe else ""
    lines.append(f"  --config.{f.name}={show(value)}\n      {f.meaning}; {f.describe()}{safe}")
  return "\n".join(lines)
