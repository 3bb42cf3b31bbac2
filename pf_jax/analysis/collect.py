"""Collecting outputs during training for the forgetting analysis (paper Section 6.1).

Every `config.analysis.collect_every_steps` steps the trainer runs the forgetting split (the
eval split of `config.analysis.dataset`, default the first of `config.eval_datasets`) through
the trainer's collect step (`train.make_collect_step`, passed in): likelihoods at theta and at theta^p, where each m-chunk of the split
gets the perturbation the run's next training step would compute from that chunk and its labels
(same objective, rho_t, ASAM, m and PRNG key; `sam_family.perturbed_logits`). The split is cut
into batches of the training micro-batch size, so m chunks it exactly as in training; the last
batch is completed with examples from the start of the split (wrap-around), which take part in
its chunks' perturbations but are not recorded twice. Models run in inference mode (BatchNorm
with running statistics) for both theta and theta^p.

Each point is stored as `<workdir>/forgetting/step_<step>.npz` (process 0): step, epoch,
num_examples, accuracy at theta (and theta^p), the binned-information curves `cond`, `rel`
(and `cond_p`, `rel_p`) at `information.THRESHOLD_EXPONENTS`, and the raw likelihoods and labels
when examples x classes <= `config.analysis.max_raw_values` (ImageNet's 50 000 x 1000 outputs
keep only the curves: a few kB per point).
"""

import io
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from pf_jax import experiment
from pf_jax.analysis import information

DIRNAME = "forgetting"


def _wrap_around(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  """Fills padding (mask 0) with real examples from the first batch, cyclically."""
  pool = None
  for batch in batches:
    real = batch["mask"] > 0
    if pool is None:
      pool = {k: v[real] for k, v in batch.items()}
    if not real.all():
      holes = np.flatnonzero(~real)
      take = np.arange(len(holes)) % len(pool["mask"])
      batch = {k: v.copy() for k, v in batch.items()}
      for k in ("image", "label"):
        batch[k][holes] = pool[k][take]
    yield batch


def collect(exp, state, collect_step, batch_sharding) -> dict[str, np.ndarray]:
  """Likelihoods on the whole forgetting split, in its order (every process gets all of them).

  Args:
    exp: the run's `experiment.Experiment`.
    state: the training state whose outputs are collected.
    collect_step: (params, batch_stats, step, batch) -> {"probs": ..., "probs_p": ...}.
    batch_sharding: how a batch is laid out over the devices.

  Returns:
    {"probs", "probs_p" (with a perturbation), "labels"} over the split's examples.
  """
  from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: only here)

  it = input_pipeline.eval_iterator(
    experiment.forgetting_dataset(exp.config), **exp.pipeline_args("collect")
  )
  outputs, labels, masks = [], [], []
  for batch in _wrap_around(it):
    labels.append(batch["label"])
    masks.append(batch["mask"])
    device_batch = {
      k: jax.make_array_from_process_local_data(batch_sharding, batch[k])
      for k in ("image", "label")
    }
    outputs.append(collect_step(state.params, state.batch_stats, state.step, device_batch))
  num_processes = jax.process_count()

  def in_split_order(blocks):
    # Each gathered batch is [process 0's part, process 1's part, ...]; every process reads a
    # contiguous range of the split, so putting each process's batches together restores it.
    x = np.stack([np.asarray(multihost_utils.process_allgather(b, tiled=True)) for b in blocks])
    x = x.reshape((x.shape[0], num_processes, -1) + x.shape[2:]).swapaxes(0, 1)
    return x.reshape((-1,) + x.shape[3:])

  keep = in_split_order(masks) > 0
  return dict(
    {k: in_split_order([o[k] for o in outputs])[keep] for k in outputs[0]},
    labels=in_split_order(labels)[keep],
  )


def summarize(
  outputs: dict[str, np.ndarray], *, step: int, epoch: float, max_raw_values: int
) -> dict[str, np.ndarray]:
  """The stored record of one collection point (module doc)."""
  labels = outputs["labels"]
  t = information.thresholds()
  record = {
    "step": np.int64(step),
    "epoch": np.float64(epoch),
    "num_examples": np.int64(labels.shape[0]),
    "threshold_exponents": information.THRESHOLD_EXPONENTS,
  }
  for suffix in ("", "_p"):
    if "probs" + suffix not in outputs:
      continue
    probs = outputs["probs" + suffix]
    record["accuracy" + suffix] = np.float64(np.mean(np.argmax(probs, axis=-1) == labels))
    record["cond" + suffix], record["rel" + suffix] = information.binned_information(
      probs, labels, t
    )
    if probs.size <= max_raw_values:
      record["probs" + suffix] = probs
  if outputs["probs"].size <= max_raw_values:
    record["labels"] = labels
  return record


def collect_point(
  exp, state, collect_step, batch_sharding, workdir, *, step: int
) -> dict[str, float]:
  """Collects, stores (process 0) and returns the accuracies of one point, for the logs.

  Args:
    exp: the run's `experiment.Experiment`.
    state: the training state at `step`.
    collect_step: the trainer's collect step.
    batch_sharding: how a batch is laid out over the devices.
    workdir: the run's workdir (the point goes to its `forgetting/`).
    step: the training step of the point.

  Returns:
    {"forgetting/accuracy", "forgetting/accuracy_p"}: top-1 on the split at theta and theta^p.
  """
  c = exp.config
  outputs = collect(exp, state, collect_step, batch_sharding)
  record = summarize(
    outputs,
    step=step,
    epoch=step * c.global_batch_size / exp.num_train_examples,
    max_raw_values=c.analysis.max_raw_values,
  )
  if jax.process_index() == 0:
    save_point(workdir, record)
  return {f"forgetting/{k}": float(record[k]) for k in ("accuracy", "accuracy_p") if k in record}


def _point_path(workdir, step: int) -> epath.Path:
  return epath.Path(workdir) / DIRNAME / f"step_{int(step):09d}.npz"


def has_point(workdir, step: int) -> bool:
  return _point_path(workdir, step).exists()


def missed_note(workdir, every: int | None, start_step: int, total_steps: int) -> str | None:
  """One line when a resumed run (or a finished one run again) has collection steps before
  `start_step` without a point: they cannot be collected afterwards (a point needs the training
  state of its step, which no checkpoint keeps), so the user learns it now, not from the analysis.
  None when nothing was missed."""
  if not every or not start_step:
    return None
  missed = [s for s in range(every, start_step, every) if not has_point(workdir, s)]
  if not missed:
    return None
  if len(missed) == 1:
    steps = f"step {missed[0]} cannot be collected afterwards (it needs the state of that step)"
  else:
    steps = (
      f"{len(missed)} steps ({missed[0]}..{missed[-1]}) cannot be collected afterwards (they "
      "need the state of those steps)"
    )
  if start_step < total_steps:
    later = f"only the steps from {start_step} on are collected"
  elif start_step % every == 0:
    later = f"only its last step, {start_step}, is collected"
  else:
    later = "nothing is left to collect"
  return (
    f"config.analysis.collect_every_steps={every}: this run was at step {start_step} of "
    f"{total_steps} before it was set, and the outputs of {steps}; {later}. For the analysis "
    "of every step, train it afresh with this setting in a new --workdir"
  )


def save_point(workdir, record: dict[str, np.ndarray]) -> None:
  path = _point_path(workdir, record["step"])
  directory = path.parent
  directory.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **record)
  tmp = directory / (path.name + ".tmp")
  tmp.write_bytes(buffer.getvalue())
  tmp.replace(path)  # a re-collected point (after a resume) replaces the earlier one


def load_points(workdir) -> list[dict[str, np.ndarray]]:
  """A run's collection points, by step."""
  directory = epath.Path(workdir) / DIRNAME
  if not directory.exists():
    return []
  points = []
  for path in sorted(directory.glob("step_*.npz")):
    with np.load(io.BytesIO(path.read_bytes())) as data:
      points.append({k: data[k] for k in data.files})
  return points
