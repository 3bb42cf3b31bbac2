"""One run's objects, built once: `build(config, ...)` -> `Experiment`.

Everything the train, eval and collect steps and the sharpness tool need that follows from the
config, the dataset facts (class count, training-set size) and the devices: the model and its
apply function, BatchNorm or not, the task loss, the `SamSpec`, the compute dtype, the optimizer,
the learning-rate and rho schedules, the step counts and the batch sizes. Library arguments come
from the field declarations (`config_fields.library_kwargs`); the values computed from several
fields (rho as a schedule, batch sizes) are set here, `grad_accum_steps` by train.py's step and
the sharpness iterations by analysis/sharpness.py.

The config-only derivations (`schedule`, `sam_spec`, `optimizer`, `shrink_perturb`,
`per_device_batch`, `forgetting_dataset`) are functions here too, so validation checks exactly
what a run builds.
No TensorFlow, no data reading, no checkpoint reading: building is pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pf_jax import config_fields
from pf_jax import losses
from pf_jax import models
from pf_jax import optimizers
from pf_jax import perturbations
from pf_jax import sam_family
from pf_jax import schedules

_OPTIMIZERS = {"adamw": optimizers.adamw, "sgdw": optimizers.sgdw}  # config.optimizer


class RunState(flax.struct.PyTreeNode):
  """What a checkpoint holds (a run's state; `pf_jax.TrainState` is the library's Flax one).

  Attributes:
    step: the number of steps taken.
    params: the model parameters.
    batch_stats: BatchNorm running statistics ({} without BatchNorm).
    opt_state: the optimizer's state.
    init_variables: {"params", "batch_stats"} at step 0, which shrink-and-perturb pulls the
      state toward (None without it).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  init_variables: Any = None


def schedule(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int, int]:
  """(total steps, warmup steps, steps per epoch): epochs become steps unless steps are given.

  Args:
    c: a config.
    num_train_examples: size of the training split.

  Returns:
    `num_train_steps` (or `num_epochs` in steps), `warmup_steps` (or `warmup_epochs` in steps,
    not capped: validation reports a warmup longer than the run), steps per epoch.
  """
  per_epoch = max(num_train_examples // config.global_batch_size, 1)
  total = (
    config.num_train_steps
    if config.num_train_steps is not None
    else int(config.num_epochs * per_epoch)
  )
  warmup = (
    config.warmup_steps
    if config.warmup_steps is not None
    else int(config.warmup_epochs * per_epoch)
  )
  return total, warmup, per_epoch


def pipeline_args(
  config: ml_collections.ConfigDict, use: str, local_batch_size: int
) -> dict[str, Any]:
  """`input_pipeline`'s keyword arguments for one `use` of the config's data (the one place that maps
  config fields to them).

  Args:
    c: a config.
    use: "train" (`train_iterator`), "eval" (`eval_iterator` of an evaluation dataset), "collect"
      (the forgetting split, at the training image size) or "sharpness" (the training split as
      the authors' Hessian reads it: the eval crop with the training resize, bilinear).
    local_batch_size: examples per batch of this process.
  """
  common = dict(
    data_dir=config.data_dir,
    local_batch_size=local_batch_size,
    normalization=config.image_normalization,
  )
  if use == "train":
    return dict(
      common,
      image_size=config.image_size,
      seed=config.seed,
      shuffle_buffer=config.shuffle_buffer,
      crop_area_min=config.crop_area_min,
    )
  if use == "eval":
    return dict(common, image_size=eval_image_size(config), interpolation=config.eval_interpolation)
  if use == "collect":
    return dict(common, image_size=config.image_size, interpolation=config.eval_interpolation)
  if use == "sharpness":
    return dict(common, image_size=config.image_size, interpolation="bilinear")
  raise ValueError(f"use must be 'train', 'eval', 'collect' or 'sharpness', got {use!r}")


def eval_image_size(config: ml_collections.ConfigDict) -> int:
  """Side of evaluation images: `eval_image_size`, or `image_size` when None."""
  return config.eval_image_size if config.eval_image_size is not None else config.image_size


def per_device_batch(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """Examples per device in one micro-batch: global batch / (devices x accumulation steps)."""
  return config.global_batch_size // (num_devices * config.grad_accum_steps)


def forgetting_dataset(config: ml_collections.ConfigDict) -> str:
  """The dataset whose evaluation split the forgetting analysis collects outputs on."""
  return config.analysis.dataset or config.eval_datasets[0]


def objective(config: ml_collections.ConfigDict) -> perturbations.Objective:
  """The ascent objective of `sam.perturbation`: a name, or an OBF function (fixed alpha when
  `sam.obf_alpha` is set, else alpha from lambda and gamma)."""
  name = config.sam.perturbation
  if name != "obf":
    return name
  if config.sam.obf_alpha is not None:
    return perturbations.obf_fixed_alpha(**config_fields.library_kwargs(config, "obf_fixed_alpha"))
  return perturbations.obf(**config_fields.library_kwargs(config, "obf"))


def sam_spec(config: ml_collections.ConfigDict, rho) -> sam_family.SamSpec | None:
  """The run's SAM-family member.

  Args:
    c: a config.
    rho: the radius, a float or a schedule of the step (`optimizer`'s third result).

  Returns:
    The `SamSpec` of `config.sam`, or None without a perturbation (the plain gradient).

  Raises:
    errors.ArgumentError: naming the library argument (`config_fields.field_for` names the field).
  """
  if config.sam.perturbation == "none":
    return None
  kwargs = dict(
    config_fields.library_kwargs(config, "SamSpec"), rho=rho, objective=objective(config)
  )
  return sam_family.SamSpec(**kwargs)


def optimizer(config: ml_collections.ConfigDict, total_steps: int, warmup_steps: int):
  """The base optimizer and the schedules.

  Args:
    c: a config.
    total_steps: the run's length.
    warmup_steps: linear warmup, at most `total_steps`.

  Returns:
    (optax transformation applied to the final SAM gradient: clipping, then the base optimizer;
    learning-rate schedule; rho, a float or an lr-proportional schedule). Shrink-and-perturb acts
    on the state before the gradient (`shrink_perturb`), not here.
  """
  kw = lambda fn: config_fields.library_kwargs(config, fn)
  lr = schedules.warmup_linear_decay(
    **kw("warmup_linear_decay"), warmup_steps=warmup_steps, total_steps=total_steps
  )
  parts = []
  if config.clip_grad_norm is not None:
    parts.append(optax.clip_by_global_norm(**kw("clip_by_global_norm")))
  parts.append(_OPTIMIZERS[config.optimizer](lr, **kw(config.optimizer)))
  rho = config.sam.rho_max
  if config.sam.rho_min is not None:
    rho = schedules.lr_proportional_rho(lr, **kw("lr_proportional_rho"))
  return optax.chain(*parts), lr, rho


def shrink_perturb(config: ml_collections.ConfigDict, lr) -> Callable | None:
  """The run's shrink-and-perturb, (tree, initial tree, step) -> tree, applied to the parameters
  and BatchNorm statistics before each step's forward pass (`optimizers.shrink_and_perturb`);
  None when `config.shrink_perturb` is off. `lr`: the learning-rate schedule (`optimizer`'s second)."""
  if config.shrink_perturb is None:
    return None
  kw = config_fields.library_kwargs(config, "shrink_and_perturb")
  return optimizers.shrink_and_perturb(learning_rate=lr, **kw)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """One run's objects (module doc). Build it with `build`.

  Attributes:
    config: the config it was built from (data, loop and analysis fields are read from it).
    num_classes: classes of the training dataset (the model's outputs).
    num_train_examples: size of the training split.
    num_devices: devices of the data-parallel mesh.
    num_processes: processes (hosts) reading data.
    total_steps: the run's length in steps.
    warmup_steps: learning-rate warmup in steps (at most `total_steps`).
    steps_per_epoch: training steps per pass over the training split.
    model: the Flax module, computing in `dtype`.
    has_batch_norm: the model keeps BatchNorm statistics.
    dtype: compute dtype (bfloat16 with `mixed_precision`); parameters stay float32.
    task_loss: (logits, batch) -> scalar, the loss that is minimized.
    predict: logits -> the likelihoods the forgetting analysis bins (`analysis.predictions`).
    spec: the `SamSpec`, or None without a perturbation.
    tx: the optax transformation applied to the final gradient.
    shrink: shrink-and-perturb, (tree, initial tree, step) -> tree, applied to the state before
      each step's forward pass, or None (`shrink_perturb`).
    lr: the learning-rate schedule.
    rho: the perturbation radius, a float or a schedule.
    per_device_batch: examples per device in one micro-batch.
    local_batch_size: training examples per step read by each process.
    local_micro_batch_size: one micro-batch's examples read by each process (the forgetting
      split is cut into these, so m chunks it as in training).
    local_eval_batch_size: evaluation examples per batch read by each process.
    eval_image_size: side of evaluation images.
  """

  config: ml_collections.ConfigDict
  num_classes: int
  num_train_examples: int
  num_devices: int
  num_processes: int
  total_steps: int
  warmup_steps: int
  steps_per_epoch: int
  model: Any
  has_batch_norm: bool
  dtype: Any
  task_loss: Callable
  predict: Callable
  spec: sam_family.SamSpec | None
  tx: optax.GradientTransformation
  shrink: Callable | None
  lr: Callable
  rho: Any
  per_device_batch: int
  local_batch_size: int
  local_micro_batch_size: int
  local_eval_batch_size: int
  eval_image_size: int

  def apply(self, params, batch_stats, images, train: bool):
    """(logits, new batch_stats): train mode updates BatchNorm statistics, eval mode reads them."""
    if not self.has_batch_norm:
      return self.model.apply({"params": params}, images, train=train), batch_stats
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
      return self.model.apply(variables, images, train=False), batch_stats
    logits, new = self.model.apply(variables, images, train=True, mutable=["batch_stats"])
    return logits, new["batch_stats"]

  def seed_key(self) -> jax.Array:
    """`PRNGKey(config.seed)`, the root of every random choice in the compiled steps."""
    return jax.random.PRNGKey(self.config.seed)

  def step_key(self, step, seed_key=None) -> jax.Array:
    """PRNG key of training step `step + 1` (random perturbations); the collect step reuses it.

    `seed_key`: `seed_key()` passed in as an argument (a program that serves every seed), or
    None: computed from `config.seed` (a constant of the program)."""
    return jax.random.fold_in(self.seed_key() if seed_key is None else seed_key, step)

  def pipeline_args(self, use: str) -> dict[str, Any]:
    """`pipeline_args(config, use, ...)` at this run's batch per process: "train" (the batch),
    "eval" (the eval batch) or "collect" (a micro-batch: the program's shapes)."""
    batch = {
      "train": self.local_batch_size,
      "eval": self.local_eval_batch_size,
      "collect": self.local_micro_batch_size,
    }[use]
    return pipeline_args(self.config, use, batch)

  def model_in(self, dtype) -> Any:
    """The same model computing in `dtype` (the sharpness tool uses float32)."""
    c = self.config
    kwargs = config_fields.library_kwargs(c, "build_model")
    return models.build_model(c.model, num_classes=self.num_classes, dtype=dtype, **kwargs)

  def init_state(self, seed_key=None) -> RunState:
    """A fresh state from `config.seed` (pure: jit it, or `jax.eval_shape` it for a target);
    `seed_key`: `seed_key()` passed in as an argument, or None: computed from `config.seed`."""
    size = self.config.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    key = self.seed_key() if seed_key is None else seed_key
    variables = self.model.init(key, dummy, train=False)
    params = flax.core.unfreeze(variables["params"])
    return self.state_at(params, flax.core.unfreeze(variables.get("batch_stats", {})))

  def state_at(self, params, batch_stats) -> RunState:
    """The step-0 state at these variables: a fresh optimizer state and, with shrink-and-perturb,
    these variables as its initial values (also for a fine-tuning run's loaded weights)."""
    init_variables = None
    if self.shrink is not None:
      # Copies: the step donates the state, and one buffer cannot be donated twice.
      init_variables = jax.tree.map(jnp.array, {"params": params, "batch_stats": batch_stats})
    return RunState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=self.tx.init(params),
      init_variables=init_variables,
    )


def build(
  config: ml_collections.ConfigDict,
  *,
  num_classes: int,
  num_train_examples: int,
  num_devices: int,
  num_processes: int = 1,
) -> Experiment:
  """The run of a valid config (`config_validation.validate`) on these devices.

  Args:
    c: the config.
    num_classes: classes of `config.dataset`.
    num_train_examples: size of its training split.
    num_devices: devices of the mesh (all processes together).
    num_processes: processes reading data.

  Returns:
    The `Experiment`.

  Example: `build(common.base_config(), num_classes=10, num_train_examples=1438,
  num_devices=1).total_steps` is 110 (10 epochs of 11 steps).
  """
  total, warmup, per_epoch = schedule(config, num_train_examples)
  warmup = min(warmup, total)
  tx, lr, rho = optimizer(config, total, warmup)
  dtype = jnp.bfloat16 if config.mixed_precision else jnp.float32
  model = models.build_model(
    config.model,
    num_classes=num_classes,
    **config_fields.library_kwargs(config, "build_model"),
    dtype=dtype,
  )
  return Experiment(
    config=config,
    num_classes=num_classes,
    num_train_examples=num_train_examples,
    num_devices=num_devices,
    num_processes=num_processes,
    total_steps=total,
    warmup_steps=warmup,
    steps_per_epoch=per_epoch,
    model=model,
    has_batch_norm=models.has_batch_norm(config.model),
    dtype=dtype,
    task_loss=losses.get_loss(config.loss, **config_fields.library_kwargs(config, "get_loss")),
    predict=jax.nn.softmax if config.analysis.predictions == "softmax" else jax.nn.sigmoid,
    spec=sam_spec(config, rho),
    tx=tx,
    shrink=shrink_perturb(config, lr),
    lr=lr,
    rho=rho,
    per_device_batch=per_device_batch(config, num_devices),
    local_batch_size=config.global_batch_size // num_processes,
    local_micro_batch_size=config.global_batch_size // config.grad_accum_steps // num_processes,
    local_eval_batch_size=config.eval_batch_size // num_processes,
    eval_image_size=eval_image_size(config),
  )
