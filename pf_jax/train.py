"""Training and evaluation: `train_and_evaluate(config, workdir)`.

Data parallel over a 1-D device mesh ('data'): the train step runs under `jax.jit` +
`jax.shard_map`, each device holding a shard of the global batch and a replica of the state.
The SAM-family gradient comes from `pf_jax.sam_value_and_grad` (per-device m-chunks, gradient
accumulation, BatchNorm statistics from the unperturbed pass), then the base optimizer. Every random choice is a
function of (config.seed, step) and the data order is step-addressable, so a run resumed from
a checkpoint ends bit-identical to an uninterrupted one.
"""

import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pf_jax import checkpointing
from pf_jax import config_validation
from pf_jax import input_pipeline
from pf_jax import losses
from pf_jax import models
from pf_jax import optimizers
from pf_jax import reporting
from pf_jax import sam_family as sam_lib
from pf_jax import schedules
from pf_jax import workdir as workdir_lib
from pf_jax.analysis import collect as collect_lib

AXIS = "data"


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def validate_config(
  c: ml_collections.ConfigDict, num_devices: int | None = None, num_processes: int | None = None
) -> None:
  """`config_validation.validate` against this job's devices and processes (ConfigError)."""
  num_devices = num_devices or jax.device_count()
  num_processes = num_processes or jax.process_count()
  config_validation.validate(c, num_devices, num_processes)
  per_device = c.global_batch_size // (num_devices * c.grad_accum_steps)
  if c.sam.perturbation != "none" and models.has_batch_norm(c.model) and c.sam.m > per_device:
    logging.warning(
      "config.sam.m=%d spans %d devices: BatchNorm uses each device's own batch "
      "statistics (not the whole chunk's)",
      c.sam.m,
      c.sam.m // per_device,
    )


def train_schedule(c, num_train_examples: int):
  """(total steps, warmup steps) from epochs unless given directly."""
  total, warmup, _ = config_validation.schedule(c, num_train_examples)
  return total, min(warmup, total)


def create_optimizer(c, total_steps: int, warmup_steps: int):
  """(base optax transformation, lr schedule, rho: float or schedule)."""
  lr = schedules.warmup_linear_decay(c.lr_max, c.lr_min, warmup_steps, total_steps)
  if c.optimizer == "adamw":
    base = optimizers.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
  else:
    base = optimizers.sgdw(lr, momentum=c.momentum, weight_decay=c.weight_decay)
  parts = [optax.clip_by_global_norm(c.clip_grad_norm)] if c.clip_grad_norm else []
  parts.append(base)
  if c.shrink_perturb:
    parts.append(optimizers.shrink_and_perturb(c.shrink_perturb, lr, lr_max=c.lr_max))
  s = c.sam
  rho = s.rho_max
  if s.rho_min >= 0:
    rho = schedules.lr_proportional_rho(lr, c.lr_max, c.lr_min, s.rho_max, s.rho_min)
  return optax.chain(*parts), lr, rho


def compute_dtype(c):
  """bfloat16 activations with config.mixed_precision; parameters always stay float32."""
  return jnp.bfloat16 if c.mixed_precision else jnp.float32


def build_model(c, num_classes: int):
  return models.build_model(
    c.model, num_classes=num_classes, head_bias_init=c.head_bias_init, dtype=compute_dtype(c)
  )


def _model_apply(model, has_bn: bool):
  """(params, batch_stats, images, train) -> (logits, new batch_stats)."""

  def apply(params, batch_stats, images, train):
    if not has_bn:
      return model.apply({"params": params}, images, train=train), batch_stats
    if not train:
      return model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=False
      ), batch_stats
    logits, new = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    return logits, new["batch_stats"]

  return apply


def sam_spec(c, rho) -> sam_lib.SamSpec | None:
  """The run's SAM-family member with its rho (float or schedule); None without a perturbation."""
  s = c.sam
  if s.perturbation == "none":
    return None
  return sam_lib.SamSpec(
    rho=rho,
    objective=config_validation.objective(c),
    m=s.m,
    chunk_mode=s.chunk_mode,
    gsam_alpha=s.gsam_alpha,
    gsam_normalized_backup=s.gsam_normalized_backup,
    asam=s.asam or None,
    asam_eta=s.asam_eta,
  )


def step_key(c, step) -> jax.Array:
  """PRNG key of training step `step + 1` (random perturbations); the analysis reuses it."""
  return jax.random.fold_in(jax.random.PRNGKey(c.seed), step)


def top1(logits, labels) -> jax.Array:
  """Fraction of examples whose top logit is the label (or the largest target of [B, C] ones)."""
  labels = jnp.argmax(labels, axis=-1) if labels.ndim == 2 else labels
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def make_train_step(c, model, tx, rho, mesh, lr=None):
  """jit(shard_map(step)): (state, batch) -> (state, metrics), metrics replicated.

  Every method, with or without accumulation, is one call of `pf_jax.sam_value_and_grad`.
  `lr`, the learning-rate schedule, adds the step's learning rate to the metrics (computed here,
  so logging it runs no op outside the compiled step).
  """
  apply = _model_apply(model, models.has_batch_norm(c.model))
  task_loss = losses.get_loss(c.loss, c.label_smoothing)
  spec = sam_spec(c, rho)
  dtype = compute_dtype(c)

  def forward(params, batch_stats, b):
    """(logits, (new batch statistics, top-1 of the chunk)): the aux of the pass at theta."""
    logits, new_stats = apply(params, batch_stats, b["image"], True)
    return logits, (new_stats, top1(logits, b["label"]))

  def step(state: TrainState, batch):
    batch = {"image": batch["image"].astype(dtype), "label": batch["label"]}
    grad_fn = sam_lib.sam_value_and_grad(
      lambda p, b: forward(p, state.batch_stats, b),
      task_loss,
      spec,
      has_aux=True,
      axis_name=AXIS,
      accum_steps=c.grad_accum_steps,
    )
    (_, (new_stats, train_top1), metrics), grads = grad_fn(
      state.params, batch, step=state.step, rng=step_key(c, state.step)
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(
      step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
    )
    # A non-finite loss, gradient or result skips the step (decided here, no host sync): the state
    # stays finite, so no checkpoint can hold a NaN. (Values are replicated: all devices agree.)
    finite = checkpointing.all_finite((metrics["loss"], grads, params, new_stats, opt_state))
    new = jax.tree.map(
      lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1)
    )
    metrics = dict(
      metrics,
      top1=train_top1,
      grad_norm=optax.tree.norm(grads),
      nonfinite=1 - finite.astype(jnp.float32),
    )
    if lr is not None:
      metrics["lr"] = lr(state.step)
    return new, metrics

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)


def make_eval_step(c, model, mesh, subset: np.ndarray | None):
  """jit(shard_map): (params, batch_stats, totals, batch) -> totals + this batch's counts.

  The running totals go through the compiled step (summed over all devices), so an evaluation
  runs no op-by-op `add` that would compile outside it; `evaluate` starts them at zero.
  """
  apply = _model_apply(model, models.has_batch_norm(c.model))
  dtype = compute_dtype(c)
  task_loss = losses.get_loss(c.loss, c.label_smoothing)  # the training loss, per example below
  per_example = jax.vmap(lambda z, y: task_loss(z[None], y[None]))

  def step(params, batch_stats, totals, batch):
    logits, _ = apply(params, batch_stats, batch["image"].astype(dtype), False)
    if subset is not None:  # ImageNet-R: only its 200 classes' logits compete
      logits = logits[:, jnp.asarray(subset)]
    pred = jnp.argmax(logits, axis=-1)
    mask = batch["mask"]
    out = {
      "correct": jnp.sum((pred == batch["label"]) * mask),
      "count": jnp.sum(mask),
      "loss": jnp.sum(per_example(logits.astype(jnp.float32), batch["label"]) * mask),
    }
    if "real_label" in batch:  # ReaL: correct if the prediction is any of the real labels
      valid = batch["real_valid"] * mask
      hit = jnp.take_along_axis(batch["real_label"], pred[:, None], axis=-1)[:, 0]
      out.update(real_correct=jnp.sum(hit * valid), real_count=jnp.sum(valid))
    out = jax.lax.psum(out, AXIS)
    return jax.tree.map(jnp.add, totals, out) if totals else out  # {}: only for shapes

  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)), out_specs=P()))


def make_collect_step(c, model, mesh, rho):
  """jit(shard_map): (params, batch_stats, step, batch) -> likelihoods at theta (and theta^p).

  For the forgetting analysis (pf_jax/analysis/collect.py): the model in inference mode; theta^p
  per m-chunk of the batch from `sam_family.perturbed_logits` with the run's own `SamSpec`, the
  rho and PRNG key of the next training step. Likelihoods are the softmax of the logits whatever
  the loss, as Section 6.1 bins "the model's softmax outputs"; `analysis.predictions = "sigmoid"`
  bins per-class sigmoids instead (an explicit option, e.g. to look at what a BCE run optimizes).
  """
  apply = _model_apply(model, models.has_batch_norm(c.model))
  task_loss = losses.get_loss(c.loss, c.label_smoothing)
  predict = jax.nn.softmax if c.analysis.predictions == "softmax" else jax.nn.sigmoid
  spec = sam_spec(c, rho)
  dtype = compute_dtype(c)

  def step(params, batch_stats, step, batch):
    batch = {"image": batch["image"].astype(dtype), "label": batch["label"]}
    forward = lambda p, b: apply(p, batch_stats, b["image"], False)[0].astype(jnp.float32)
    if spec is None:
      return {"probs": predict(forward(params, batch))}
    clean, perturbed = sam_lib.perturbed_logits(
      forward, task_loss, spec, params, batch, step=step, rng=step_key(c, step), axis_name=AXIS
    )
    return {"probs": predict(clean), "probs_p": predict(perturbed)}

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)), out_specs=P(AXIS))
  )


def evaluate(c, state, eval_steps, batch_sharding) -> dict[str, float]:
  results = {}
  local_batch = c.eval_batch_size // jax.process_count()
  for name, eval_step in eval_steps.items():
    it = input_pipeline.eval_iterator(
      name,
      data_dir=c.data_dir,
      image_size=c.eval_image_size if c.eval_image_size > 0 else c.image_size,
      local_batch_size=local_batch,
      interpolation=c.eval_interpolation,
      normalization=c.image_normalization,
    )
    totals = None
    for batch in input_pipeline.prefetch_to_device(it, 2, batch_sharding):
      if totals is None:  # zeros shaped like the step's counts, placed without compiling
        shapes = jax.eval_shape(eval_step, state.params, state.batch_stats, {}, batch)
        totals = jax.device_put(
          jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
          NamedSharding(batch_sharding.mesh, P()),
        )
      totals = eval_step(state.params, state.batch_stats, totals, batch)
    totals = jax.device_get(totals)
    results[f"eval/{name}/top1"] = float(totals["correct"] / max(totals["count"], 1))
    results[f"eval/{name}/loss"] = float(totals["loss"] / max(totals["count"], 1))
    if "real_count" in totals:
      results[f"eval/{name}/real_top1"] = float(
        totals["real_correct"] / max(totals["real_count"], 1)
      )
  return results


def load_variables(path: str):
  """(params, batch_stats, step) of the latest checkpoint of a workdir (or checkpoint directory).

  Raw arrays on one local device, whatever device count the checkpoint was saved on.
  """
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restored, step = checkpointing.restore_arrays(path, sharding)
  return restored["params"], restored.get("batch_stats", {}), step


def pretrained_variables(path: str, model_name: str):
  """(params, batch_stats) to fine-tune from: a pf_jax workdir/checkpoint directory, or a PyTorch
  checkpoint file (`.pth`/`.pth.tar`, e.g. written by the paper authors' train.py) of the same
  model, converted with `models.from_torch`. Raises config_validation.ConfigError (one line)."""
  try:
    if models.torch_weights.is_torch_checkpoint(path):
      state_dict = models.torch_weights.read_checkpoint(path)
      variables = models.from_torch(model_name, state_dict)
      return variables["params"], variables["batch_stats"]
    params, batch_stats, _ = load_variables(path)
    return params, batch_stats
  except ValueError as e:
    raise config_validation.ConfigError("init_from", path, str(e)) from None


def _merge_pretrained(fresh, pretrained, path=""):
  """Pretrained values for every leaf but the classification head (kept freshly initialized)."""
  if isinstance(fresh, dict):
    return {
      k: v if k == "head" else _merge_pretrained(v, pretrained[k], f"{path}/{k}")
      for k, v in fresh.items()
    }
  if tuple(fresh.shape) != tuple(np.shape(pretrained)):
    raise ValueError(
      f"config.init_from: {path} has shape {np.shape(pretrained)}, model needs {fresh.shape}"
    )
  return jnp.asarray(pretrained, fresh.dtype)


def create_state(c, model, tx, num_classes: int) -> TrainState:
  dummy = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
  variables = model.init(jax.random.PRNGKey(c.seed), dummy, train=False)
  params = flax.core.unfreeze(variables["params"])
  batch_stats = flax.core.unfreeze(variables.get("batch_stats", {}))
  if c.init_from:
    pre_params, pre_stats = pretrained_variables(c.init_from, c.model)
    params = _merge_pretrained(params, pre_params)
    batch_stats = _merge_pretrained(batch_stats, pre_stats) if batch_stats else batch_stats
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params)
  )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  allow_config_change: bool = False,
  note: str | None = None,
) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest good checkpoint; returns final eval metrics.

  Raises checkpointing.Preempted once the current step is saved after SIGTERM/SIGINT or a
  preemption notice, workdir.ConfigMismatchError if `workdir` holds a run with another config
  (unless `allow_config_change`), checkpointing.NonFiniteError after
  `config.max_consecutive_nonfinite` skipped non-finite steps. `note` ends the start line (e.g.
  what a `,local` variant changed).
  """
  c = config
  validate_config(c)
  workdir = checkpointing.as_path(workdir)
  checkpoint_dir = workdir / "checkpoints"
  checkpointing.tidy(checkpoint_dir)
  has_run = checkpoint_dir.exists() and any(p.name.isdigit() for p in checkpoint_dir.iterdir())
  workdir_lib.check_config(workdir, c, has_run=has_run, allow_change=allow_config_change)
  # Every dataset the run will read is checked before anything compiles.
  num_classes, num_train = input_pipeline.dataset_info(c.dataset, data_dir=c.data_dir)
  # Every dataset the run will read must be readable now, not after hours of training.
  eval_sizes = {
    name: input_pipeline.eval_size(name, data_dir=c.data_dir) for name in c.eval_datasets
  }
  if c.analysis.collect_every_steps:
    input_pipeline.get_builder(collect_lib.forgetting_dataset(c), c.data_dir)
  total_steps, warmup_steps = train_schedule(c, num_train)
  model = build_model(c, num_classes)
  tx, lr_schedule, rho = create_optimizer(c, total_steps, warmup_steps)

  mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(AXIS))

  checkpoints = ocp.CheckpointManager(
    checkpoint_dir,
    options=ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints, create=True),
  )
  state = None
  if has_run:
    # Restore into the structure and shardings of a fresh state (no pretrained load needed).
    init_free = c.copy_and_resolve_references()
    with init_free.unlocked():
      init_free.init_from = ""
    target = jax.eval_shape(lambda: create_state(init_free, model, tx, num_classes))
    target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), target
    )
    latest, state = checkpointing.restore_latest(checkpoints, target)
  if state is None and not c.init_from:  # compiled init: much faster than op-by-op for large models
    state = jax.jit(
      functools.partial(create_state, c, model, tx, num_classes), out_shardings=replicated
    )()
  elif state is None:  # finetuning reads the other run's checkpoint on the host
    state = jax.device_put(create_state(c, model, tx, num_classes), replicated)
  start_step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    workdir_lib.save_config(workdir, c)

  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(
      {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in workdir_lib.flatten(c.to_dict()).items()
      }
    )
  hooks = []  # steps_per_sec is written with every train log (the Reporter's rate)
  if c.profile and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=str(workdir)))

  train_step = make_train_step(c, model, tx, rho, mesh, lr_schedule)
  eval_steps = {
    name: make_eval_step(c, model, mesh, input_pipeline.class_subset(name))
    for name in c.eval_datasets
  }
  collect_every = c.analysis.collect_every_steps
  collect_step = make_collect_step(c, model, mesh, rho) if collect_every else None
  if (
    collect_every
    and start_step
    and start_step % collect_every == 0
    and not collect_lib.has_point(workdir, start_step)
  ):  # preempted right at a collection step
    writer.write_scalars(
      start_step,
      collect_lib.collect_point(
        c,
        state,
        collect_step,
        batch_sharding,
        workdir,
        step=start_step,
        num_train_examples=num_train,
      ),
    )
  train_iter = input_pipeline.train_iterator(
    c.dataset,
    data_dir=c.data_dir,
    image_size=c.image_size,
    local_batch_size=c.global_batch_size // jax.process_count(),
    seed=c.seed,
    start_step=start_step,
    shuffle_buffer=c.shuffle_buffer,
    crop_area_min=c.crop_area_min,
    normalization=c.image_normalization,
  )
  train_iter = input_pipeline.prefetch_to_device(train_iter, 2, batch_sharding)

  report = reporting.Reporter(total_steps, start_step, enabled=jax.process_index() == 0)
  report.start(
    c.model,
    sum(x.size for x in jax.tree.leaves(state.params)),
    c.dataset,
    num_train,
    eval_sizes,
    warmup_steps,
    jax.device_count(),
    jax.process_count(),
    workdir,
    method=reporting.describe_method(c, jax.device_count()),
    note=note,
  )
  if start_step:
    report.resumed(start_step, checkpoint_dir)
  pending, fetched, results, streak, saving = [], [], {}, 0, None
  with checkpointing.SignalCatcher() as signals:
    for step in range(start_step + 1, total_steps + 1):
      first = step == start_step + 1
      if first:
        report.compiling()
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, next(train_iter))
      if first:  # the only wait outside logging: compilation time, then the steady rate
        jax.block_until_ready(metrics)
        report.compiled(step)
      pending.append(
        metrics
      )  # device arrays; fetched only when logging or saving (no per-step sync)
      for hook in hooks:
        hook(step)
      last = step == total_steps
      # SIGTERM/SIGINT (this process) or a TPU/cluster preemption notice (multi-host sync).
      preempted = signals.received is not None or checkpoints.reached_preemption(step)
      save = step % c.checkpoint_every_steps == 0 or last or preempted
      if step % c.log_every_steps == 0 or last or save:
        for i, m in enumerate(jax.device_get(pending)):  # skipped steps were decided in the step
          streak = streak + 1 if m["nonfinite"] else 0
          if streak >= c.max_consecutive_nonfinite:
            writer.flush()
            raise checkpointing.NonFiniteError(
              f"{streak} consecutive steps with a non-finite loss or gradient (skipped), the last at "
              f"step {step - len(pending) + 1 + i}: stopping; last good checkpoint: "
              f"{checkpointing.last_good(checkpoints)}"
            )
          fetched.append(m)
        pending = []
      if step % c.log_every_steps == 0 or last:
        summary = _summarize(fetched)
        summary["steps_per_sec"] = report.train(step, summary)
        writer.write_scalars(step, summary)
        fetched = []
      if (step % c.eval_every_steps == 0 or last) and not preempted:  # preempted: save first
        eval_start = time.time()
        results = evaluate(c, state, eval_steps, batch_sharding)
        writer.write_scalars(step, results)
        report.eval(step, results, time.time() - eval_start)
      if collect_every and step % collect_every == 0 and not preempted:  # outputs at theta, theta^p
        writer.write_scalars(
          step,
          collect_lib.collect_point(
            c, state, collect_step, batch_sharding, workdir, step=step, num_train_examples=num_train
          ),
        )
      # A save is reported once it completed (asynchronous; a failure is one StorageError line).
      if saving and (
        save or (jax.process_count() == 1 and not checkpoints.is_saving_in_progress())
      ):
        checkpointing.finish(checkpoints, saving)
        report.checkpoint(saving, checkpoints.directory)
        saving = None
      if save:
        checkpointing.save(checkpoints, step, state, force=preempted, config=c)
        saving = step
      if saving and (preempted or last):
        checkpointing.finish(checkpoints, saving)
        report.checkpoint(saving, checkpoints.directory)
        saving = None
      if preempted:
        checkpoints.wait_until_finished()
        checkpoints.close()
        writer.flush()
        logging.warning(
          "Preempted at step %d: checkpoint saved in %s, stopping", step, checkpoint_dir
        )
        raise checkpointing.Preempted(step, checkpoint_dir)
  checkpoints.wait_until_finished()
  checkpoints.close()
  if not results and start_step >= total_steps:  # already finished: report the final evaluation
    results = evaluate(c, state, eval_steps, batch_sharding)
    writer.write_scalars(total_steps, results)
  writer.flush()
  final_step = int(jax.device_get(state.step))
  if results and jax.process_index() == 0 and final_step == total_steps:
    workdir_lib.save_results(workdir, total_steps, results)
  report.summary(
    final_step, results, workdir, note=None if final_step == total_steps else "stopped early"
  )
  return results


# Metrics that are schedules of the step: logged at the log step, not averaged since the last log.
SCHEDULED_METRICS = ("lr", "rho")


def _summarize(fetched) -> dict[str, float]:
  """Means over the finite steps since the last log (schedules: their value at the last step), and
  the number of skipped (non-finite) ones."""
  finite = [m for m in fetched if not m["nonfinite"]]

  def value(k):
    if not finite:
      return float("nan")
    return float(finite[-1][k] if k in SCHEDULED_METRICS else np.mean([m[k] for m in finite]))

  out = {f"train/{k}": value(k) for k in fetched[0] if k != "nonfinite"}
  out["train/nonfinite_steps"] = float(sum(m["nonfinite"] for m in fetched))
  return out
