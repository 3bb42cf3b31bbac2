"""The paper's "SHARPNESS" column for a trained run: `python -m pf_jax.analysis sharpness`.

The dominant Hessian eigenvalue (`hessian.hessian_top_eigenvalue`) of the run's training loss
(its config's loss without label smoothing, as the authors' compute_hessian_*.sh run
validate.py with its default --smoothing 0) at the latest checkpoint, on the first
`analysis.sharpness_examples` examples of the training split in their stored order, without
augmentation (the evaluation center crop), in batches of `analysis.sharpness_batch_size`.
The model runs in inference mode: BatchNorm uses its running statistics, so the loss is a fixed
function of the parameters (train-mode statistics would make it depend on the batching).
Computed in float32 even for mixed-precision runs. Result in `<workdir>/sharpness.json`; when
the split holds fewer full batches than configured, it records (and says) how many examples were
used and why (`num_examples` of `num_examples_configured`, `note`).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from pf_jax import checkpointing
from pf_jax import dataset_catalog
from pf_jax import experiment
from pf_jax import losses
from pf_jax import workdir as workdir_lib
from pf_jax.analysis import hessian

RESULT_FILE = "sharpness.json"


def training_batches(config, num_examples: int, batch_size: int, counted: dict | None = None):
  """The first num_examples // batch_size full batches of the training split, stacked.

  `counted`, if given, gets "split_examples": how many the split holds when it ends first."""
  from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: only here)

  split = input_pipeline.DATASETS[config.dataset].train_split
  it = input_pipeline.eval_iterator(
    config.dataset,
    split=split,
    process_index=0,
    process_count=1,
    **experiment.pipeline_args(config, "sharpness", batch_size),
  )
  batches = []
  for batch in it:
    if len(batches) * batch_size >= num_examples:
      break
    if batch["mask"].min() < 1:  # the split ends inside this batch
      if counted is not None:
        counted["split_examples"] = len(batches) * batch_size + int(batch["mask"].sum())
      break
    batches.append({"image": batch["image"], "label": batch["label"]})
  if not batches:
    raise ValueError(
      f"config.analysis.sharpness_batch_size: {batch_size} is larger than the "
      f"{config.dataset} training split"
    )
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def loss_function(config, exp: experiment.Experiment, batch_stats):
  """(params, batch) -> the run's training loss of one batch, as the Hessian sees it (module doc:
  float32, inference mode with the running `batch_stats`, no label smoothing)."""
  model = exp.model_in(jnp.float32)
  loss = losses.get_loss(config.loss, 0.0)  # the authors' Hessian: no label smoothing
  variables = {"batch_stats": batch_stats} if batch_stats else {}

  def loss_fn(p, batch):
    logits = model.apply(dict(variables, params=p), batch["image"], train=False)
    return loss(logits, batch["label"])

  return loss_fn


def checkpoint_sharpness(
  workdir,
  *,
  num_examples: int | None = None,
  batch_size: int | None = None,
  num_iters: int | None = None,
  tol: float | None = None,
  seed: int = 0,
  log=None,
) -> dict[str, float]:
  """Sharpness of the run in `workdir` (module doc); also written to `<workdir>/sharpness.json`.

  `log(line)`, if given, receives progress lines (examples used, every 10th power iteration)."""
  log = log or (lambda line: None)
  c = workdir_lib.load_config(workdir)
  a = c.analysis
  num_examples = num_examples or a.sharpness_examples
  batch_size = min(batch_size or a.sharpness_batch_size, num_examples)
  num_iters = num_iters or a.sharpness_iters
  tol = tol or a.sharpness_tol
  params, batch_stats, step = checkpointing.load_variables(workdir)
  spec = dataset_catalog.DATASETS[c.dataset]
  exp = experiment.build(
    c,
    num_classes=spec.num_classes,
    num_train_examples=spec.train_examples,
    num_devices=jax.device_count(),
  )
  loss_fn = loss_function(c, exp, batch_stats)
  counted = {}
  batches = training_batches(c, num_examples, batch_size, counted)
  used = int(jax.tree.leaves(batches)[0].shape[0] * batch_size)
  note = None
  if used < num_examples:
    why = (
      f"the {c.dataset} training split holds {counted['split_examples']}"
      if "split_examples" in counted
      else f"{num_examples} is not a multiple of the batch size"
    )
    note = f"{used} of {num_examples} examples: {why}, in full batches of {batch_size}"
  log(
    f"sharpness of step {int(step)}: {used} examples in batches of {batch_size}"
    + (f" ({note})" if note else "")
    + f", up to {num_iters} power iterations (tol {tol:g})"
  )

  def progress(i, eig):
    if i % 10 == 0:
      log(f"  iteration {i}: {eig:.6g}")

  params = jax.tree.map(jnp.asarray, params)
  value = hessian.hessian_top_eigenvalue(
    loss_fn,
    params,
    batches,
    num_iters=num_iters,
    tol=tol,
    rng=jax.random.PRNGKey(seed),
    progress=progress,
  )
  result = {
    "sharpness": value,
    "step": int(step),
    "num_examples": used,
    "num_examples_configured": num_examples,
    "num_iters": num_iters,
    "tol": tol,
    "seed": seed,
  }
  if note:
    result["note"] = note
  path = epath.Path(workdir) / RESULT_FILE
  path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
  return result


def load(workdir, notes: list[str] | None = None) -> float | None:
  """The run's measured sharpness; None if there is none or it is stale.

  Stale: measured at a step before the run's last (`results.json`); then a line saying so is
  appended to `notes`. A `sharpness.json` without a step (written before it had one) is used.
  """
  path = epath.Path(workdir) / RESULT_FILE
  if not path.exists():
    return None
  stored = json.loads(path.read_text())
  results = epath.Path(workdir) / workdir_lib.RESULTS_FILE
  last = json.loads(results.read_text()).get("step") if results.exists() else None
  if last is not None and stored.get("step") is not None and stored["step"] < last:
    if notes is not None:
      notes.append(
        f"{workdir}: sharpness measured at step {stored['step']}, the run ended at step {last}: "
        f"not used (measure it again: python -m pf_jax.analysis sharpness --workdir={workdir})"
      )
    return None
  return stored["sharpness"]
