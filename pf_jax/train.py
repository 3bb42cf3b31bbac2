"""Training and evaluation: `train_and_evaluate(config, workdir)`.

Data parallel over a 1-D device mesh ('data'): the train step runs under `jax.jit` +
`jax.shard_map`, each device holding a shard of the global batch and a replica of the state.
The SAM-family gradient comes from `pf_jax.sam_value_and_grad` (per-device m-chunks, gradient
accumulation, BatchNorm statistics from the unperturbed pass), then the base optimizer. Every
random choice is a function of (config.seed, step) and the data order is step-addressable, so a
run resumed from a checkpoint ends bit-identical to an uninterrupted one.

Everything the steps use comes from one `experiment.Experiment`, built once per run. The config
is validated before (main.py: `config_validation.validate`), not here.

The one hook into `pf_jax.analysis`: `analysis.collect` (`collect_point`, `has_point`) records
the forgetting split's outputs every `analysis.collect_every_steps` steps; the analysis itself
never imports this module.
"""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pf_jax import checkpointing
from pf_jax import experiment as experiment_lib
from pf_jax import input_pipeline
from pf_jax import pretrained
from pf_jax import process
from pf_jax import reporting
from pf_jax import sam_family as sam_lib
from pf_jax import workdir as workdir_lib
from pf_jax.analysis import collect as collect_lib  # the one hook (module doc)
from pf_jax.experiment import RunState

AXIS = "data"


def make_experiment(config: ml_collections.ConfigDict) -> experiment_lib.Experiment:
  """The run of `config` on this job's devices, with the training set's facts read from TFDS.

  Args:
    c: a validated config.

  Returns:
    `experiment.build(c, ...)` for `jax.device_count()` devices.

  Raises:
    input_pipeline.DatasetNotPreparedError: the training dataset cannot be read.
  """
  num_classes, num_train = input_pipeline.dataset_info(config.dataset, data_dir=config.data_dir)
  return experiment_lib.build(
    config,
    num_classes=num_classes,
    num_train_examples=num_train,
    num_devices=jax.device_count(),
    num_processes=jax.process_count(),
  )


def top1(logits, labels) -> jax.Array:
  """Fraction of examples whose top logit is the label (or the largest target of [B, C] ones)."""
  labels = jnp.argmax(labels, axis=-1) if labels.ndim == 2 else labels
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def cached_program(
  cache: dict | None, kind: str, exp: experiment_lib.Experiment, mesh: Mesh, build
):
  """`build()`, or what it returned for an earlier run of `cache` that differs only in its seed.

  The programs take the seed's key as an argument, so runs of one config with other seeds (a
  launcher's seeds, in one process) share them: no tracing, no compilation.

  Args:
    cache: a dict the caller keeps across runs (the programs go to `cache["programs"]`), or
      None (no reuse).
    kind: which program ("train", "init", "eval/<dataset>").
    exp: the run; its config without `seed`, dataset facts and devices form the key.
    mesh: the device mesh.
    build: () -> the program.
  """
  if cache is None:
    return build()
  programs = cache.setdefault("programs", {})
  config = exp.config.to_dict()
  config.pop("seed")
  facts = (exp.num_classes, exp.num_train_examples, exp.num_processes, mesh.axis_names)
  devices = [d.id for d in mesh.devices.flat]
  key = json.dumps([kind, config, facts, devices], sort_keys=True, default=repr)
  if key not in programs:
    programs[key] = build()
  return programs[key]


def replicated_seed_key(exp: experiment_lib.Experiment, mesh: Mesh) -> jax.Array:
  """`exp.seed_key()` on every device of `mesh` (placed without compiling)."""
  key = np.asarray(exp.seed_key())
  return jax.make_array_from_callback(key.shape, NamedSharding(mesh, P()), lambda i: key[i])


def make_train_step(exp: experiment_lib.Experiment, mesh: Mesh, cache: dict | None = None):
  """The compiled training step.

  Every method, with or without accumulation, is one call of `pf_jax.sam_value_and_grad`;
  shrink-and-perturb (`exp.shrink`) first moves the parameters and BatchNorm statistics toward
  their initial values, so the gradient is taken at the shrunk state (the authors' train.py). The
  metrics include the step's learning rate (computed in the step, so logging it runs no op
  outside the compiled program).

  Args:
    exp: the run.
    mesh: the 1-D device mesh (axis "data").
    cache: `cached_program`'s dict, or None.

  Returns:
    (state, batch) -> (state, metrics): jit(shard_map(step)) with the seed's key as an argument;
    the state is donated, the metrics replicated.
  """
  program = cached_program(cache, "train", exp, mesh, lambda: _train_program(exp, mesh))
  seed_key = replicated_seed_key(exp, mesh)
  return lambda state, batch: program(state, batch, seed_key)


def _train_program(exp: experiment_lib.Experiment, mesh: Mesh):
  """jit(shard_map(step)): (state, batch, seed key) -> (state, metrics) (`make_train_step`)."""
  dtype = exp.dtype

  def forward(params, batch_stats, b):
    """(logits, (new batch statistics, top-1 of the chunk)): the aux of the pass at theta."""
    logits, new_stats = exp.apply(params, batch_stats, b["image"], True)
    return logits, (new_stats, top1(logits, b["label"]))

  def step(state: RunState, batch, seed_key):
    batch = {"image": batch["image"].astype(dtype), "label": batch["label"]}
    params, batch_stats = state.params, state.batch_stats
    if exp.shrink is not None:  # shrink-and-perturb: the whole state, before the forward pass
      params = exp.shrink(params, state.init_variables["params"], state.step)
      batch_stats = exp.shrink(batch_stats, state.init_variables["batch_stats"], state.step)
    grad_fn = sam_lib.sam_value_and_grad(
      lambda p, b: forward(p, batch_stats, b),
      exp.task_loss,
      exp.spec,
      has_aux=True,
      axis_name=AXIS,
      accum_steps=exp.config.grad_accum_steps,
    )
    (_, (new_stats, train_top1), metrics), grads = grad_fn(
      params, batch, step=state.step, rng=exp.step_key(state.step, seed_key)
    )
    updates, opt_state = exp.tx.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
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
    metrics["lr"] = exp.lr(state.step)
    return new, metrics

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)


def make_eval_step(exp: experiment_lib.Experiment, mesh: Mesh, subset: np.ndarray | None):
  """The compiled evaluation step.

  The running totals go through the compiled step (summed over all devices), so an evaluation
  runs no op-by-op `add` that would compile outside it; `evaluate` starts them at zero.

  Args:
    exp: the run.
    mesh: the 1-D device mesh.
    subset: the logits that compete (`input_pipeline.class_subset`), or None: all.

  Returns:
    jit(shard_map): (params, batch_stats, totals, batch) -> totals + this batch's counts.
  """
  # The training loss, per example.
  per_example = jax.vmap(lambda z, y: exp.task_loss(z[None], y[None]))

  def step(params, batch_stats, totals, batch):
    logits, _ = exp.apply(params, batch_stats, batch["image"].astype(exp.dtype), False)
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


def make_collect_step(exp: experiment_lib.Experiment, mesh: Mesh):
  """The compiled step that collects outputs for the forgetting analysis (`analysis.collect`).

  The model runs in inference mode; theta^p per m-chunk of the batch comes from
  `sam_family.perturbed_logits` with the run's own `SamSpec`, the rho and PRNG key of the next
  training step. Likelihoods: `exp.predict`, the softmax of the logits whatever the loss, as
  Section 6.1 bins "the model's softmax outputs" (`analysis.predictions = "sigmoid"`: per-class
  sigmoids, an explicit option, e.g. to look at what a BCE run optimizes).

  Args:
    exp: the run.
    mesh: the 1-D device mesh.

  Returns:
    jit(shard_map): (params, batch_stats, step, batch) -> {"probs", "probs_p" (with a
    perturbation)}, sharded like the batch.
  """
  predict, spec = exp.predict, exp.spec

  def step(params, batch_stats, step, batch):
    batch = {"image": batch["image"].astype(exp.dtype), "label": batch["label"]}
    forward = lambda p, b: exp.apply(p, batch_stats, b["image"], False)[0].astype(jnp.float32)
    if spec is None:
      return {"probs": predict(forward(params, batch))}
    clean, perturbed = sam_lib.perturbed_logits(
      forward, exp.task_loss, spec, params, batch, step=step, rng=exp.step_key(step), axis_name=AXIS
    )
    return {"probs": predict(clean), "probs_p": predict(perturbed)}

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS)), out_specs=P(AXIS))
  )


def evaluate(
  exp: experiment_lib.Experiment, state, eval_steps, batch_sharding, cache: dict | None = None
) -> dict[str, float]:
  """Top-1 (and ReaL top-1) of `state` on each evaluation dataset.

  Args:
    exp: the run.
    state: the training state.
    eval_steps: {dataset: its `make_eval_step`}.
    batch_sharding: how a batch is laid out over the devices.
    cache: `input_pipeline.cached_batches`'s dict (the batches of earlier evaluations), or None.

  Returns:
    {"eval/<dataset>/top1": ..., "eval/<dataset>/real_top1": ... (ReaL only)}.
  """
  results, args = {}, exp.pipeline_args("eval")
  for name, eval_step in eval_steps.items():
    it = input_pipeline.cached_batches(
      cache,
      _iterator_key("eval", name, args),
      lambda name=name: input_pipeline.eval_iterator(name, **args),
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


def pretrained_variables(path: str, model_name: str):
  """(params, batch_stats) of config.init_from (`pretrained.read`): a pf_jax workdir or
  checkpoint directory, or a PyTorch checkpoint file of the same model (`models.from_torch`).

  Raises:
    config_validation.ConfigError: one line naming config.init_from.
  """
  return pretrained.read(path, model_name)[:2]


def load_pretrained(exp: experiment_lib.Experiment, state: RunState, path: str) -> RunState:
  """`state` with the parameters and BatchNorm statistics of config.init_from, but its own head
  and a fresh optimizer state (`pretrained.load`, which also says what it loaded).

  Raises:
    config_validation.ConfigError: the weights cannot be read or do not fit the model.
  """
  return pretrained.load(exp, state, path)[0]


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  allow_config_change: bool = False,
  note: str | None = None,
  cache: dict | None = None,
) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest good checkpoint; returns final eval metrics.

  Raises checkpointing.Preempted once the current step is saved after SIGTERM/SIGINT or a
  preemption notice, workdir.ConfigMismatchError if `workdir` holds a run with another config
  (unless `allow_config_change`), checkpointing.NonFiniteError after
  `config.max_consecutive_nonfinite` skipped non-finite steps. `note` ends the start line (e.g.
  what a `,local` variant changed). `cache`: a dict kept across runs in one process: later runs
  of the same config with another seed reuse its compiled programs (`cached_program`), and runs that read
  the same training or evaluation batches reuse those (`input_pipeline.cached_batches`).
  """
  c, workdir = config, checkpointing.as_path(workdir)
  exp, eval_sizes, has_run = _prepare(c, workdir, allow_config_change)
  total_steps, lead = exp.total_steps, jax.process_index() == 0
  mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
  batch_sharding = NamedSharding(mesh, P(AXIS))
  checkpoints = checkpointing.RunCheckpoints(
    workdir, c, on_saved=lambda step, directory: report.checkpoint(step, directory)
  )
  state, loaded = _initial_state(exp, mesh, checkpoints, cache, has_run)
  start_step = int(jax.device_get(state.step))
  if lead:
    workdir_lib.save_config(workdir, c)
  writer = _writer(c, workdir, start_step)
  hooks = (
    [periodic_actions.Profile(num_profile_steps=5, logdir=str(workdir))]
    if c.profile and lead
    else []
  )
  train_step = make_train_step(exp, mesh, cache)
  eval_steps = make_eval_steps(exp, mesh, cache)
  collect = _Collector(exp, mesh, state, batch_sharding, workdir, writer, start_step)
  train_iter = _train_iterator(exp, start_step, cache, batch_sharding)
  report = reporting.Reporter(total_steps, start_step, enabled=lead)
  _start_line(report, exp, state, eval_sizes, workdir, note, loaded)
  if start_step:
    report.resumed(start_step, checkpoints.directory)
  metrics_log, results = _MetricsLog(c, checkpoints, writer), {}
  with process.SignalCatcher() as signals:
    for step in range(start_step + 1, total_steps + 1):
      if step == start_step + 1:
        report.compiling()
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, next(train_iter))
      if step == start_step + 1:  # the only wait outside logging: compilation, then steady rate
        jax.block_until_ready(metrics)
        report.compiled(step)
      metrics_log.add(metrics)  # device arrays; fetched only when logging or saving
      for hook in hooks:
        hook(step)
      last = step == total_steps
      # SIGTERM/SIGINT (this process) or a TPU/cluster preemption notice (multi-host sync).
      preempted = signals.received is not None or checkpoints.reached_preemption(step)
      save = due(step, c.checkpoint_every_steps, last) or preempted
      if due(step, c.log_every_steps, last) or save:
        metrics_log.fetch(step)  # NonFiniteError after too many skipped steps
      if due(step, c.log_every_steps, last):
        summary = metrics_log.summary()
        summary["steps_per_sec"] = report.train(step, summary)
        writer.write_scalars(step, summary)
      if due(step, c.eval_every_steps, last) and not preempted:  # preempted: save first
        results = _evaluate_and_log(
          exp, state, eval_steps, batch_sharding, cache, writer, report, step
        )
      if not preempted:  # the forgetting split's outputs at theta and theta^p
        collect.at(step, state)
      checkpoints.maybe_save(step, state, due=save, preempted=preempted, last=last)
      if preempted:
        checkpoints.close()
        writer.flush()
        logging.warning(
          "Preempted at step %d: checkpoint saved in %s, stopping", step, checkpoints.directory
        )
        raise checkpointing.Preempted(step, checkpoints.directory)
  checkpoints.close()
  if not results and start_step >= total_steps:  # already finished: report the final evaluation
    results = evaluate(exp, state, eval_steps, batch_sharding, cache)
    writer.write_scalars(total_steps, results)
  writer.flush()
  final_step = int(jax.device_get(state.step))
  checkpoints.check_intact(final_step)  # results only beside the run
  if results and lead and final_step == total_steps:
    workdir_lib.save_results(workdir, total_steps, results)
  report.summary(
    final_step, results, workdir, note=None if final_step == total_steps else "stopped early"
  )
  return results


def due(step: int, every: int, last: bool) -> bool:
  """Periodic work runs every `every` steps and at the run's last step."""
  return step % every == 0 or last


def _prepare(config, workdir, allow_change: bool):
  """(Experiment, {eval dataset: size}, whether the workdir holds checkpoints) after the checks
  that must pass before anything compiles: the workdir's run and config, every dataset read."""
  checkpoint_dir = workdir / "checkpoints"
  checkpointing.tidy(checkpoint_dir)
  has_run = checkpoint_dir.exists() and any(p.name.isdigit() for p in checkpoint_dir.iterdir())
  workdir_lib.check_config(workdir, config, has_run=has_run, allow_change=allow_change)
  exp = make_experiment(config)
  eval_sizes = {
    name: input_pipeline.eval_size(name, data_dir=config.data_dir) for name in config.eval_datasets
  }
  if config.analysis.collect_every_steps:
    input_pipeline.get_builder(experiment_lib.forgetting_dataset(config), config.data_dir)
  if exp.spec is not None and exp.has_batch_norm and exp.spec.m > exp.per_device_batch:
    logging.warning(
      "config.sam.m=%d spans %d devices: BatchNorm uses each device's own batch "
      "statistics (not the whole chunk's)",
      exp.spec.m,
      exp.spec.m // exp.per_device_batch,
    )
  return exp, eval_sizes, has_run


def _initial_state(exp, mesh: Mesh, checkpoints, cache, has_run: bool):
  """(state, what config.init_from loaded or None): the newest restorable checkpoint, else a
  fresh state (with config.init_from's weights)."""
  c, replicated = exp.config, NamedSharding(mesh, P())
  if has_run:  # restored into the structure and shardings of a fresh state
    target = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
      jax.eval_shape(exp.init_state),
    )
    state = checkpoints.restore(target)
    if state is not None:
      return state, None
  if jax.process_index() == 0:  # seconds to minutes of silence otherwise
    logging.info("initializing %s (compiling its init)", c.model)
  init = cached_program(
    cache, "init", exp, mesh, lambda: jax.jit(exp.init_state, out_shardings=replicated)
  )
  state = init(replicated_seed_key(exp, mesh))  # compiled: much faster than op by op
  if c.init_from is None:
    return state, None
  state, loaded = pretrained.load(exp, jax.device_get(state), c.init_from)  # on the host
  return jax.device_put(state, replicated), loaded


def _writer(config, workdir, start_step: int):
  """clu's writer (TensorBoard on process 0); the hyperparameters at a run's first start."""
  writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(
      {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in workdir_lib.flatten(config.to_dict()).items()
      }
    )
  return writer


def make_eval_steps(exp: experiment_lib.Experiment, mesh: Mesh, cache: dict | None = None):
  """{evaluation dataset: its compiled `make_eval_step`} (`cached_program` across seeds)."""
  return {
    name: cached_program(
      cache,
      f"eval/{name}",
      exp,
      mesh,
      lambda name=name: make_eval_step(exp, mesh, input_pipeline.class_subset(name)),
    )
    for name in exp.config.eval_datasets
  }


def _train_iterator(exp, start_step: int, cache, batch_sharding):
  """The training batches from `start_step` on, prefetched onto the devices."""
  c, args = exp.config, exp.pipeline_args("train")
  it = input_pipeline.cached_batches(
    None if start_step else cache,  # a resumed run reads its own batches from start_step
    _iterator_key("train", c.dataset, args),
    lambda: input_pipeline.train_iterator(c.dataset, start_step=start_step, **args),
  )
  return input_pipeline.prefetch_to_device(it, 2, batch_sharding)


def _start_line(report, exp, state, eval_sizes, workdir, note, loaded) -> None:
  c = exp.config
  report.start(
    c.model,
    sum(x.size for x in jax.tree.leaves(state.params)),
    c.dataset,
    exp.num_train_examples,
    eval_sizes,
    exp.warmup_steps,
    jax.device_count(),
    jax.process_count(),
    workdir,
    method=reporting.describe_method(c, jax.device_count()),
    note=note,
    loaded=loaded,
  )


def _iterator_key(use: str, dataset: str, args: dict) -> tuple:
  """`input_pipeline.cached_batches`'s key: the same batches for the same arguments on this process."""
  return (use, dataset, jax.process_index(), jax.process_count(), *sorted(args.items()))


def _evaluate_and_log(exp, state, eval_steps, batch_sharding, cache, writer, report, step):
  eval_start = time.time()
  results = evaluate(exp, state, eval_steps, batch_sharding, cache)
  writer.write_scalars(step, results)
  report.eval(step, results, time.time() - eval_start)
  return results


class _Collector:
  """The forgetting split's outputs every `analysis.collect_every_steps` steps (`analysis.collect`);
  at the start, says which collections a resumed run missed and makes up one it was preempted at."""

  def __init__(self, exp, mesh, state, batch_sharding, workdir, writer, start_step: int):
    self.exp, self.batch_sharding, self.workdir, self.writer = exp, batch_sharding, workdir, writer
    self.every = exp.config.analysis.collect_every_steps
    self.step_fn = make_collect_step(exp, mesh) if self.every else None
    missed = collect_lib.missed_note(workdir, self.every, start_step, exp.total_steps)
    if missed and jax.process_index() == 0:
      logging.warning("%s", missed)
    if (
      self.every
      and start_step
      and start_step % self.every == 0
      and not collect_lib.has_point(workdir, start_step)
    ):  # preempted right at a collection step
      self.at(start_step, state)

  def at(self, step: int, state) -> None:
    if self.every and step % self.every == 0:
      point = collect_lib.collect_point(
        self.exp, state, self.step_fn, self.batch_sharding, self.workdir, step=step
      )
      self.writer.write_scalars(step, point)


class _MetricsLog:
  """The train metrics since the last log line: kept on device until a log or save fetches them;
  a run stops after `max_consecutive_nonfinite` skipped (non-finite) steps in a row."""

  def __init__(self, config, checkpoints, writer):
    self.limit, self.checkpoints, self.writer = (
      config.max_consecutive_nonfinite,
      checkpoints,
      writer,
    )
    self.pending, self.fetched, self.streak = [], [], 0

  def add(self, metrics) -> None:
    self.pending.append(metrics)

  def fetch(self, step: int) -> None:
    for i, m in enumerate(jax.device_get(self.pending)):  # skipped steps were decided in the step
      self.streak = self.streak + 1 if m["nonfinite"] else 0
      if self.streak >= self.limit:
        self.writer.flush()
        raise checkpointing.NonFiniteError(
          f"{self.streak} consecutive steps with a non-finite loss or gradient (skipped), the "
          f"last at step {step - len(self.pending) + 1 + i}: stopping; last good checkpoint: "
          f"{self.checkpoints.last_good()}"
        )
      self.fetched.append(m)
    self.pending = []

  def summary(self) -> dict[str, float]:
    summary, self.fetched = _summarize(self.fetched), []
    return summary


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
