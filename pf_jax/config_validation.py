"""The check of a whole config: each field against its declaration, then the rules across fields.

The fields' allowed values are declared in `config_fields.FIELDS`; `validate` applies them, then
the rules that involve several fields (step counts, batch sizes against devices, rho range, image
size against the model) and the library's own checks of what `experiment` builds, each reported
under the config field that feeds the refused argument (`config_fields.field_for`).

Nothing here imports TensorFlow or compiles anything, so a bad value stops a run in about a
second with one line: `config.<field>: <value> — <what is allowed>`. main.py runs it once, before
anything else.
"""

import difflib
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from pf_jax import config_fields
from pf_jax import dataset_catalog
from pf_jax import experiment
from pf_jax import models
from pf_jax import reporting
from pf_jax import sam_family
from pf_jax.errors import DASH
from pf_jax.errors import ArgumentError

_get = config_fields.get


class ConfigError(ValueError):
  """One-line error naming the config field: `config.<field>: <value> — <allowed>`."""

  def __init__(self, field: str, value: Any, allowed: str):
    self.field = field
    super().__init__(f"config.{field}: {config_fields.show(value)} {DASH} {allowed}")


def suggest(name: str, names: Sequence[str]) -> str:
  """'; did you mean x?' for the closest of `names`, or ''. Spelling first (difflib), then the
  leaf name, then the words of each field's meaning (`learning_rate` -> lr_max, "learning rate
  after warmup")."""
  close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
  leaf = name.rsplit(".", 1)[-1]
  if not close:  # a typo in the last part only: compare the leaf names
    leaves = {n.rsplit(".", 1)[-1]: n for n in names}
    close = [leaves[x] for x in difflib.get_close_matches(leaf, list(leaves), n=1)]
  if not close:  # another name for the same thing: the words of a field's meaning
    words = leaf.lower().replace("_", " ").replace("-", " ")
    close = [
      n
      for n in names
      if n in config_fields.BY_NAME and words in config_fields.BY_NAME[n].meaning.lower()
    ][:1]
  return f"; did you mean {close[0]}?" if close else ""


# -- Rules across fields. ------------------------------------------------------------------------


def _check_schedule(config):
  # Counted with the catalog's training-set size: no data is read before the checks.
  total, warmup, per_epoch = experiment.schedule(
    config, dataset_catalog.DATASETS[config.dataset].train_examples
  )
  if total < 1:
    raise ConfigError(
      "num_epochs",
      config.num_epochs,
      f"at least one step: 1 epoch of {config.dataset} is {per_epoch} steps of {config.global_batch_size}",
    )
  if warmup > total:
    field = "warmup_steps" if config.warmup_steps is not None else "warmup_epochs"
    raise ConfigError(
      field,
      _get(config, field),
      f"at most the run's length: {warmup} warmup steps > "
      f"{total} steps" + ("" if config.warmup_steps is not None else " (or set warmup_steps)"),
    )
  if config.lr_min > config.lr_max:
    raise ConfigError("lr_min", config.lr_min, f"at most lr_max={config.lr_max}")


def _check_batches(config, num_devices: int, num_processes: int):
  if (
    config.global_batch_size % (num_devices * config.grad_accum_steps)
    or config.global_batch_size % num_processes
  ):
    raise ConfigError(
      "global_batch_size",
      config.global_batch_size,
      f"a multiple of devices ({num_devices}) x grad_accum_steps ({config.grad_accum_steps})"
      + (f" and of the {num_processes} processes" if num_processes > 1 else ""),
    )
  if config.eval_batch_size % num_devices or config.eval_batch_size % num_processes:
    raise ConfigError(
      "eval_batch_size",
      config.eval_batch_size,
      f"a multiple of the {reporting.plural(num_devices, 'device')}",
    )
  multiple = models.input_multiple(config.model)
  if config.image_size % multiple:
    raise ConfigError(
      "image_size", config.image_size, f"a multiple of {config.model}'s patch size {multiple}"
    )
  if multiple > 1 and config.eval_image_size not in (None, config.image_size):
    raise ConfigError(
      "eval_image_size",
      config.eval_image_size,
      f"None or image_size ({config.image_size}): {config.model}'s position embeddings fix its input size",
    )


def _check_sam(config, num_devices: int):
  s = config.sam
  if s.perturbation == "none":
    for field, off in (("gsam_alpha", 0.0), ("asam", "none")):
      if s[field] != off:
        raise ConfigError(
          f"sam.{field}",
          s[field],
          f"{off!r} when sam.perturbation is 'none' (GSAM and ASAM modify a perturbation)",
        )
    return
  per_device = experiment.per_device_batch(config, num_devices)
  try:
    sam_family.chunking(s.m, per_device, num_devices)
  except ValueError:
    raise ConfigError(
      "sam.m",
      s.m,
      f"a divisor of the per-device micro-batch {per_device} (global batch "
      f"/ ({reporting.plural(num_devices, 'device')} x {config.grad_accum_steps} accumulation steps)) "
      f"or a multiple of it spanning a divisor of the {reporting.plural(num_devices, 'device')}",
    ) from None
  if s.rho_min is not None:
    if s.rho_min > s.rho_max:
      raise ConfigError(
        "sam.rho_min", s.rho_min, f"at most sam.rho_max={s.rho_max} (or None: constant rho)"
      )
    if config.lr_max == config.lr_min:
      raise ConfigError(
        "sam.rho_min",
        s.rho_min,
        "None (constant rho): an lr-proportional rho needs lr_max != lr_min",
      )
  # The library's own checks of what the run builds, under the field that feeds each argument.
  try:
    experiment.sam_spec(config, s.rho_max)
  except ArgumentError as e:
    field = config_fields.field_for(e.function, e.arg)
    if field is None:
      raise
    raise ConfigError(field, _get(config, field), str(e)) from e


def _check_init_from(config):
  path = config.init_from
  if path is None or "://" in path:
    return
  allowed = "a workdir or checkpoint directory that holds a checkpoint, or a .pth/.pth.tar/.pt file"
  if not os.path.exists(path):
    raise ConfigError("init_from", path, allowed + " (it does not exist)")
  if os.path.isfile(path) and path.endswith((".pth", ".pth.tar", ".pt")):  # is_torch_checkpoint
    return
  # A checkpoint is a step-numbered folder in the workdir's checkpoints/ or the directory itself.
  sub = os.path.join(path, "checkpoints")
  directory = sub if os.path.isdir(sub) else path
  if not os.path.isdir(directory) or not any(n.isdigit() for n in os.listdir(directory)):
    raise ConfigError("init_from", path, allowed + f" (no step folder in {directory!r})")


def _check_analysis(config):
  """The forgetting split must share the training labels: OBF and its accuracy read them."""
  if not config.analysis.collect_every_steps:
    return
  name = experiment.forgetting_dataset(config)
  want = dataset_catalog.DATASETS[config.dataset].num_classes
  if dataset_catalog.DATASETS[name].num_classes != want:
    field = "analysis.dataset" if config.analysis.dataset else "eval_datasets"
    raise ConfigError(
      field,
      _get(config, field),
      f"a forgetting split with the {want} classes of "
      f"{config.dataset} ({name} has {dataset_catalog.DATASETS[name].num_classes}); "
      "set analysis.dataset",
    )


def validate(
  config: ml_collections.ConfigDict, num_devices: int = 1, num_processes: int = 1
) -> None:
  """Raises ConfigError for the first field that is not allowed (unknown fields included).

  Args:
    c: the config.
    num_devices: devices of the run (batch sizes and `sam.m` are checked against them).
    num_processes: processes of the run.
  """
  names = config_fields.field_names(config)
  for name in names:
    if name not in config_fields.BY_NAME:
      raise ConfigError(
        name, _get(config, name), "unknown field" + suggest(name, config_fields.NAMES)
      )
  for field in config_fields.FIELDS:
    if field.name not in names:
      raise ConfigError(
        field.name, None, "missing from the config (start from configs/common.base_config)"
      )
    if not field.ok(_get(config, field.name)):
      raise ConfigError(field.name, _get(config, field.name), field.describe())
  _check_schedule(config)
  _check_batches(config, num_devices, num_processes)
  _check_sam(config, num_devices)
  _check_init_from(config)
  _check_analysis(config)
