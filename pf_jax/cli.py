"""The command line of main.py: its flags, config files, `--config.<field>=<value>` overrides, help,
errors.

Config loading is done here rather than by `ml_collections.config_flags`, which reports a typo'd
field or a bad `:arg` as a multi-line traceback (sometimes when main.py is imported). Every
problem becomes a `UsageError` whose message is the one line main.py prints:
`config.<field>: <value> — <what is allowed>` (or `--<flag>: ...`).

No TensorFlow here: errors and --help come before it is imported.
"""

import ast
import difflib
import importlib.util
import os
import sys

import ml_collections
from absl import flags

from pf_jax import config_fields
from pf_jax import config_validation

DASH = config_validation.DASH
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")
PREFIX = "--config."
# The paper's configs, in the order --help lists them.
PAPER_CONFIGS = (
  "vit_s32_imagenet",
  "vit_s16_imagenet",
  "resnet50_imagenet",
  "resnet101_imagenet",
  "cifar_finetune",
  "cifar10_msweep",
)
OTHER_CONFIGS = ("digits_msweep", "reproduce")  # laptop-scale experiments (already local)


class UsageError(ValueError):
  """A bad command line or config; its message is one line."""


def define_flags() -> None:
  """main.py's flags (absl; called by main.py, so that importing this module defines none)."""
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


_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def _flags_help() -> str:
  """main.py's own flags (absl's help lists every library's too)."""
  lines = flags.FLAGS.module_help(sys.modules[__name__]).splitlines()
  return "\n".join(
    "  " + l if l else l for l in lines if l.strip() and not l.rstrip().endswith(":")
  )


def parse_flags(argv: list[str]) -> tuple[list[str], ml_collections.ConfigDict, str | None]:
  """main.py's command line: (absl's remaining arguments, the config, its `local_note`). --help
  writes the help and exits 0; every problem is a one-line UsageError or ConfigError."""
  rest, overrides = split_overrides(argv)
  if any(a in _HELP for a in rest[1:]):
    spec = next((a.split("=", 1)[1] for a in rest if a.startswith("--config=")), None)
    sys.stdout.write(help_text(spec, _flags_help()))
    sys.exit(0)
  FLAGS = flags.FLAGS
  try:
    rest = FLAGS(rest)
  except flags.UnrecognizedFlagError as e:
    close = difflib.get_close_matches(e.flagname, list(FLAGS), n=1)
    hint = f"; did you mean --{close[0]}?" if close else ""
    raise UsageError(
      f"--{e.flagname}: unknown flag{hint} (python main.py --help lists them)"
    ) from None
  except flags.Error as e:
    raise UsageError(str(e).splitlines()[0]) from None
  if len(rest) > 1:
    raise UsageError(f"{rest[1]!r}: unexpected argument (flags are written --name=value)")
  if FLAGS.workdir is None and not FLAGS.check_only:
    raise UsageError(
      f"--workdir: missing {DASH} a directory for checkpoints and events (--workdir=DIR)"
    )
  config = build_config(FLAGS.config, overrides)
  note = local_note(FLAGS.config, config, overrides)
  if FLAGS.compile_for and not FLAGS.check_only:
    raise UsageError("--compile_for: only with --check_only (it compiles, it does not train)")
  return rest, config, note


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """argv without the `--config.<field>=<value>` arguments, and those as (field, value)."""
  rest, overrides = [], []
  args = iter(argv)
  for a in args:
    if a.startswith(PREFIX):
      field, sep, value = a[len(PREFIX) :].partition("=")
      if not sep:  # "--config.x value"
        value = next(args, None)
        if value is None:
          raise UsageError(f"config.{field}: no value {DASH} write --config.{field}=<value>")
      overrides.append((field, value))
    else:
      rest.append(a)
  return rest, overrides


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location(f"_pf_jax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config_files() -> str:
  return ", ".join(f"configs/{n}.py" for n in ("default",) + PAPER_CONFIGS + OTHER_CONFIGS)


def load_config(spec: str | None) -> ml_collections.ConfigDict:
  """`path[:arg]` -> the file's `get_config([arg])`; UsageError for a missing file or bad arg."""
  spec = spec or DEFAULT_CONFIG
  path, sep, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UsageError(
      f"--config: {path!r} {DASH} a config file; no such file (the configs: {_config_files()})"
    )
  try:
    module = _load_module(path)
  except Exception as e:  # pylint: disable=broad-except  (any error of the user's file)
    raise UsageError(
      f"--config: {path!r} {DASH} a config file that imports; {type(e).__name__}: {e}"
    ) from e
  if not hasattr(module, "get_config"):
    raise UsageError(f"--config: {path!r} {DASH} a config file with get_config()")
  try:
    config = module.get_config(arg) if sep else module.get_config()
  except TypeError as e:
    if sep and not hasattr(module, "ARGS"):
      raise UsageError(f"--config: {spec!r} {DASH} {path} takes no ':arg'") from e
    raise
  except ValueError as e:  # the paper configs' messages list the valid args
    raise UsageError(f"--config: {spec!r} {DASH} {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"--config: {path!r} {DASH} get_config() must return a ConfigDict")
  return config


LOCAL_NOTE = (
  "a ,local variant: a smoke test of the method (tiny model on digits, {steps} steps, about "
  "chance accuracy), not a result"
)


def local_note(spec: str | None, config, overrides=()) -> str | None:
  """For a `...:<arg>,local` config: says it is a smoke test and which method fields (`sam.*`,
  loss, optimizer, accumulation) the local variant changed from the full run's, e.g. 'sam.m 64 ->
  4'. None for other configs. Fields the user set with --config.<field> are theirs, not listed."""
  path, _, arg = (spec or DEFAULT_CONFIG).partition(":")
  parts = arg.split(",")
  if "local" not in parts:
    return None
  rest = ",".join(p for p in parts if p != "local")
  full = load_config(f"{path}:{rest}" if rest else path)
  mine = {field for field, _ in overrides}
  method = ("loss", "label_smoothing", "optimizer", "grad_accum_steps")
  show, get = config_fields.show, config_fields.get
  changed = [
    f"{name} {show(full_value)} -> {show(value)}"
    for name, full_value, value in ((n, get(full, n), get(config, n)) for n in config_fields.NAMES)
    if (name.startswith("sam.") or name in method) and name not in mine and full_value != value
  ]
  note = LOCAL_NOTE.format(steps=config.num_train_steps)
  return note + (f"; it changes {', '.join(changed)}" if changed else "")


def _parse_value(config, field: str, text: str):
  """The override `text` as the type of the field's current value."""
  *parents, leaf = field.split(".")
  holder = config
  for p in parents:
    holder = holder[p]
  current = holder[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise config_validation.ConfigError(
      field, text, f"a group of fields; set config.{field}.<field>"
    )
  kind = holder.get_type(leaf)
  declared = config_fields.BY_NAME.get(field)
  if text == "None" and (current is None or (declared is not None and declared.none)):
    return holder, leaf, None
  if kind is bool:
    low = text.lower()
    if low not in ("true", "false", "1", "0"):
      raise config_validation.ConfigError(field, text, "True or False")
    return holder, leaf, low in ("true", "1")
  if kind is int:
    try:
      return holder, leaf, int(text)
    except ValueError:
      raise config_validation.ConfigError(field, text, "an integer") from None
  if kind is float:
    try:
      return holder, leaf, float(text)
    except ValueError:
      raise config_validation.ConfigError(field, text, "a number") from None
  if kind in (tuple, list):
    if text.strip()[:1] in "([":
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        raise config_validation.ConfigError(
          field, text, "a tuple, e.g. a,b or \"('a', 'b')\""
        ) from None
    else:
      value = [t.strip() for t in text.split(",") if t.strip()]
    return holder, leaf, kind(value if isinstance(value, (tuple, list)) else (value,))
  return holder, leaf, text


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
  """Sets each (field, text) in `config`; ConfigError for an unknown field or a bad value."""
  known = config_fields.field_names(config)
  groups = {n.rsplit(".", 1)[0] for n in known if "." in n}
  for field, text in overrides:
    if field not in known and field not in groups:
      raise config_validation.ConfigError(
        field, text, "unknown field" + config_validation.suggest(field, known)
      )
    holder, leaf, value = _parse_value(config, field, text)
    holder[leaf] = value


def build_config(spec: str | None, overrides) -> ml_collections.ConfigDict:
  """The config file with the overrides applied, checked field by field (not yet device rules)."""
  config = load_config(spec)
  apply_overrides(config, overrides)
  config.lock()
  return config


def help_text(spec: str | None, flags_help: str) -> str:
  """--help: main.py's flags, every config field (defaults of `spec`) and the paper configs."""
  try:
    config = load_config(spec)
    source = spec or "configs/default.py"
  except UsageError:
    config, source = load_config(None), "configs/default.py"
  lines = [
    "usage: python main.py --workdir=DIR [--config=FILE[:ARG]] [--config.FIELD=VALUE ...]",
    "",
    "Trains and evaluates one config; resumes from the workdir's latest checkpoint.",
    "",
    "flags:",
    flags_help,
    "",
    f"config fields (defaults of {source}; override with --config.FIELD=VALUE):",
    config_fields.help_text(config),
    "",
    "paper configs (--config=configs/FILE.py:ARG; append ,local for a tiny offline run on digits):",
  ]
  for name in PAPER_CONFIGS + OTHER_CONFIGS:
    if name == OTHER_CONFIGS[0]:
      lines += ["", "other configs:"]
    module = _load_module(os.path.join(REPO, "configs", f"{name}.py"))
    doc = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    lines += [f"  configs/{name}.py: {doc}", f"      ARG: {module.ARGS}"]
  return "\n".join(lines) + "\n"
