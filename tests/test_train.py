"""The training system: device-count invariance, exact resume, config validation, CLI."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default as default_config
from pf_jax import config_validation
from pf_jax import experiment
from pf_jax import train
from tests import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_config(model, perturbation, **sam):
  c = default_config.get_config()
  c.model = model
  c.global_batch_size = 16
  c.grad_accum_steps = 1
  c.sam.perturbation = perturbation
  c.sam.m = 2
  c.sam.rho_max = 0.2
  # SGD: Adam's normalization turns float round-off in near-zero gradients into full-size steps,
  # which would make a device-count comparison meaningless.
  c.optimizer = "sgdw"
  c.lr_max = 0.5
  c.weight_decay = 1e-3
  for k, v in sam.items():
    c.sam[k] = v
  return c


def _experiment(c, n_devices, total_steps=10, warmup_steps=2):
  c.num_train_steps, c.warmup_steps = total_steps, warmup_steps
  config_validation.validate(c, n_devices)
  return experiment.build(c, num_classes=10, num_train_examples=1438, num_devices=n_devices)


def _run_steps(c, n_devices, batches):
  mesh = Mesh(np.asarray(jax.devices()[:n_devices]), ("data",))
  exp = _experiment(c, n_devices)
  state = jax.device_put(jax.jit(exp.init_state)(), NamedSharding(mesh, P()))
  step = train.make_train_step(exp, mesh)
  for batch in batches:
    state, metrics = step(state, jax.device_put(batch, NamedSharding(mesh, P("data"))))
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.parametrize(
  "model,perturbation,extra",
  [
    pytest.param(  # m spans 2 of the 8 devices
      "vit_digits", "obf", dict(obf_lambda=0.1, gsam_alpha=0.2, m=4), marks=pytest.mark.long
    ),
    ("resnet_tiny", "steepest", dict(asam="before", m=2)),  # BatchNorm; m = per-device batch
  ],
)
def test_train_step_same_on_1_and_8_devices(model, perturbation, extra):
  c = _small_config(model, perturbation, **extra)
  rng = np.random.default_rng(0)
  batches = [
    {
      "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
      "label": rng.integers(0, 10, size=16).astype(np.int32),
    }
    for _ in range(3)
  ]
  one, m1 = _run_steps(c, 1, batches)
  eight, m8 = _run_steps(c, 8, batches)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), one.params, eight.params
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
    one.batch_stats,
    eight.batch_stats,
  )
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  assert int(eight.step) == 3
  start = _experiment(c, 1).init_state()
  assert any(
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(one.params))
  )


# Gradient accumulation against an independent re-implementation, where it changes the answer
# (BatchNorm statistics of each micro-batch, the PRNG key of each micro-batch): test_train_reference
# (rows "accum2"); sam_value_and_grad with m=None: test_sam.


def read_events(workdir) -> tuple[dict[str, dict[int, float]], dict]:
  """({tag: {step: value}}, hyperparameters) of the TensorBoard events in `workdir`, read with
  TensorBoard's own reader (what its dashboards show)."""
  from tensorboard.backend.event_processing import event_accumulator as ea
  from tensorboard.plugins.hparams import plugin_data_pb2
  from tensorboard.util import tensor_util

  acc = ea.EventAccumulator(str(workdir), size_guidance={ea.TENSORS: 0})
  acc.Reload()
  scalars = {
    tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
    for tag in acc.Tags()["tensors"]
    if not tag.startswith("_hparams_")
  }
  content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
  info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
  return scalars, dict(info.hparams)


def check_events(workdir, log_steps, eval_steps, eval_name, hparams):
  """steps_per_sec at every train log, train top-1, eval loss per eval dataset, hyperparameters."""
  scalars, found = read_events(workdir)
  assert sorted(scalars["steps_per_sec"]) == log_steps
  assert all(v > 0 for v in scalars["steps_per_sec"].values())
  assert sorted(scalars["train/top1"]) == log_steps
  assert all(0 <= v <= 1 for v in scalars["train/top1"].values())
  assert sorted(scalars[f"eval/{eval_name}/loss"]) == eval_steps
  assert sorted(scalars[f"eval/{eval_name}/top1"]) == eval_steps
  for name, value in hparams.items():
    assert found[name].number_value == pytest.approx(value), name


def _quick():
  """tests/tiny_run.py's run (its train step compiled once), checkpointed every 3 steps."""
  return tiny_run.config(None, checkpoint_every_steps=3, keep_checkpoints=5)


def _final_params(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    return mngr.restore(step, args=ocp.args.StandardRestore())["params"]


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.parametrize(
  "shrink_perturb",
  [pytest.param(None, id="plain"), pytest.param(0.1, marks=pytest.mark.slow, id="shrink_perturb")],
)
def test_resume_is_bit_identical_and_writes_events(tmp_path, shrink_perturb):
  data_dir = str(tmp_path / "data")
  c = _quick()
  c.data_dir = data_dir
  c.shrink_perturb = shrink_perturb  # its initial values are part of the checkpoint
  run = str(tmp_path / "run")
  res_a = train.train_and_evaluate(c, run)  # uninterrupted
  check_events(run, [2, 4, 6], [6], "digits", {"sam.rho_max": c.sam.rho_max, "lr_max": c.lr_max})
  # Eval loss: the mean task loss over the eval split (its top-1 is the one the run returns).
  assert res_a["eval/digits/loss"] > 0 and set(res_a) == {"eval/digits/loss", "eval/digits/top1"}
  pa = _final_params(run, 6)
  # "Kill" the run after its step-3 checkpoint: drop everything later and start it again.
  shutil.rmtree(os.path.join(run, "checkpoints", "6"))
  res_b = train.train_and_evaluate(c, run)
  jax.tree.map(np.testing.assert_array_equal, pa, _final_params(run, 6))
  assert res_a == res_b
  # A finished run restarted does not train again.
  assert train.train_and_evaluate(c, run) == res_a


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.long  # CI runs it (-m long); not in the default suite
def test_runs_sharing_a_cache_match_fresh_runs(tmp_path):
  """With a `cache` dict, a second seed of a config adds no program (it reuses the first seed's)
  and ends bit-identical to that seed trained alone; a third run, another method on that seed,
  reads the same batches from the cache and also matches its run alone. Random SAM reads the seed
  inside the step, so a reused program that kept the first seed would differ."""
  c0 = _quick()
  c0.data_dir = str(tmp_path / "data")
  c0.sam.perturbation = "random"
  c1 = c0.copy_and_resolve_references()
  c1.seed = 1
  c2 = c1.copy_and_resolve_references()
  c2.sam.perturbation = "steepest"
  cache = {}
  res0 = train.train_and_evaluate(c0, str(tmp_path / "s0"), cache=cache)
  kinds = sorted(json.loads(k)[0] for k in cache["programs"])
  res1 = train.train_and_evaluate(c1, str(tmp_path / "s1"), cache=cache)
  assert kinds == ["eval/digits", "init", "train"] and len(cache["programs"]) == 3
  res2 = train.train_and_evaluate(c2, str(tmp_path / "steep"), cache=cache)
  assert len(cache["batches"]) == 3  # seed 0's, seed 1's (both methods), the evaluation's
  for c, res, name in ((c1, res1, "s1"), (c2, res2, "steep")):
    alone = train.train_and_evaluate(c, str(tmp_path / f"{name}_alone"))
    assert res == alone and res != res0
    p, pa = (
      _final_params(str(tmp_path / name), 6),
      _final_params(str(tmp_path / f"{name}_alone"), 6),
    )
    jax.tree.map(np.testing.assert_array_equal, p, pa)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("sam.m", 3, "config.sam.m"),
    ("sam.rho_max", -1.0, "config.sam.rho_max"),
    ("sam.obf_gamma", 2.0, "config.sam.obf_gamma"),
    ("sam.obf_lambda", 1.0, "config.sam.obf_lambda"),
    ("sam.asam", "sideways", "config.sam.asam"),
    ("sam.gsam_alpha", -0.1, "config.sam.gsam_alpha"),
    ("sam.perturbation", "sharpest", "config.sam.perturbation"),
    ("model", "vit_huge", "config.model"),
    ("dataset", "mnist", "config.dataset"),
    ("global_batch_size", 100, "config.global_batch_size"),
    ("lr_min", 1.0, "config.lr_min"),
    ("loss", "hinge", "config.loss"),
  ],
)
def test_invalid_config_is_a_one_line_error(field, value, match):
  c = default_config.get_config()
  target, name = (c.sam, field[4:]) if field.startswith("sam.") else (c, field)
  target[name] = value
  with pytest.raises(ValueError, match=match) as err:
    config_validation.validate(c, num_devices=8, num_processes=1)
  assert "\n" not in str(err.value) and str(err.value).startswith(match + ":")


@pytest.mark.slow
def test_default_run_from_the_command_line(tmp_path):
  """The README's first command: >= 90% test accuracy on digits, then a resume, not a restart."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [
    sys.executable,
    "main.py",
    f"--workdir={tmp_path / 'run'}",
    f"--config.data_dir={tmp_path / 'data'}",
  ]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  top1 = float(out.stdout.strip().split("eval/digits/top1=")[1].split()[0])
  assert top1 >= 0.90
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run"))
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0
  lines = again.stderr.splitlines()
  assert (
    "resumed: step 275 from " in lines[[i for i, l in enumerate(lines) if "start:" in l][0] + 1]
  )
  # TensorBoard: steps_per_sec at every train log (every 50 steps and the last), eval every 200.
  check_events(
    tmp_path / "run", [50, 100, 150, 200, 250, 275], [200, 275], "digits", {"sam.rho_max": 0.3}
  )
  # The start line states the method; the ETA of every train line from the second on is within
  # 2x of the time the run really took from there (1 s log resolution allowed for).
  first = out.stderr.splitlines()
  start = next(l for l in first if " start: " in l)
  assert "method: ASAM (after, eta 0.01) with steepest ascent, rho 0.3 constant, m 32" in start
  assert "compiling the train step" in out.stderr and "compiled the train step" in out.stderr
  seconds = lambda l: sum(int(x) * f for x, f in zip(l[:8].split(":"), (3600, 60, 1)))
  done = seconds(next(l for l in first if " done: " in l))
  train_lines = [l for l in first if l[9:].startswith("train step ")]
  assert len(train_lines) == 6
  for line in train_lines[1:]:
    eta = line.rsplit("ETA ", 1)[1]
    eta = sum(int(n) * {"s": 1, "min": 60, "h": 3600}[u] for n, u in zip(*[iter(eta.split())] * 2))
    real = done - seconds(line)
    assert real / 2 - 2 <= eta <= 2 * real + 2, (line, real)


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
def test_mixed_precision_keeps_float32_params_and_tracks_float32():
  c = _small_config("vit_digits", "obf", obf_lambda=0.1, m=8)
  rng = np.random.default_rng(2)
  batches = [
    {
      "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
      "label": rng.integers(0, 10, size=16).astype(np.int32),
    }
    for _ in range(3)
  ]
  # (Step 1 has lr 0 and the zero-initialized head makes the initial logits exact: compare step 3.)
  full, m32 = _run_steps(c, 1, batches)
  c.mixed_precision = True
  half, m16 = _run_steps(c, 1, batches)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(half.params))
  # bfloat16 compute changes the numbers a little (~1e-2 relative), not the training.
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=2e-2)
  assert not np.array_equal(m16["loss"], m32["loss"])


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
def test_step_reports_its_learning_rate_and_log_lines_take_schedules_at_the_log_step():
  """Train top-1 and lr come from the compiled step (warmup 0 -> 0.5 over 2 steps: 0, 0.25, 0.5 by hand); a log
  summary averages the loss but takes lr and rho at the last step."""
  c = _small_config("vit_digits", "steepest", m=8)  # 2 chunks, not 8: a smaller program
  c.sam.rho_min = 0.0  # rho proportional to lr: a schedule too
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  exp = _experiment(c, 1)
  state = jax.device_put(jax.jit(exp.init_state)(), NamedSharding(mesh, P()))
  step = train.make_train_step(exp, mesh)
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
    "label": rng.integers(0, 10, size=16).astype(np.int32),
  }
  seen, want_top1 = [], []
  apply = jax.jit(lambda params, x: exp.model.apply({"params": params}, x, train=True))
  for _ in range(3):
    logits = apply(state.params, batch["image"])  # at theta
    want_top1.append(np.mean(np.argmax(np.asarray(logits), -1) == batch["label"]))
    state, metrics = step(state, jax.device_put(batch, NamedSharding(mesh, P("data"))))
    seen.append(jax.device_get(metrics))
  np.testing.assert_allclose([m["lr"] for m in seen], [0.0, 0.25, 0.5], atol=1e-7)
  # Train top-1: of the pass at theta, before the step's update (by hand above).
  np.testing.assert_allclose([m["top1"] for m in seen], want_top1, atol=1e-7)
  summary = train._summarize(seen)
  assert summary["train/lr"] == pytest.approx(0.5)
  assert seen[0]["rho"] < seen[-1]["rho"]
  assert summary["train/rho"] == pytest.approx(float(seen[-1]["rho"]))
  assert summary["train/loss"] == pytest.approx(np.mean([m["loss"] for m in seen]), rel=1e-6)


class _ImageIsLogits(nn.Module):
  """A parameter-free model whose logits are the image's first values: crafted predictions."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    return x.reshape((x.shape[0], -1))[:, : self.num_classes]


@pytest.mark.parametrize("subset", [None, (1, 3, 5)], ids=["imagenet_real", "imagenet_r"])
def test_evaluation_counts_top1_real_and_subset_by_hand(subset):
  """Counts of one batch on 8 devices against numpy: top-1 over the masked examples, the loss;
  ReaL: a hit if the prediction is any real label, over examples with real labels; ImageNet-R:
  the argmax over its subset's logits only (labels index the subset)."""
  from tests import reference as ref  # pylint: disable=g-import-not-at-top

  c = default_config.get_config()
  rng = np.random.default_rng(0)
  b, n = 16, 6
  logits = rng.normal(size=(b, n))
  k = n if subset is None else len(subset)
  batch = {
    "image": logits.reshape(b, 1, 2, 3).astype(np.float32),
    "label": rng.integers(0, k, size=b).astype(np.int32),
    "mask": np.array([1] * 13 + [0] * 3, np.int32),  # the last 3: padding
  }
  if subset is None:
    batch["real_label"] = (rng.random((b, n)) < 0.3).astype(np.int32)
    batch["real_valid"] = (rng.random(b) < 0.8).astype(np.int32)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  exp = experiment.build(c, num_classes=n, num_train_examples=1438, num_devices=8)
  exp = dataclasses.replace(exp, model=_ImageIsLogits(n), has_batch_norm=False)
  step = train.make_eval_step(exp, mesh, None if subset is None else np.asarray(subset))
  got = jax.device_get(step({}, {}, {}, jax.device_put(batch, NamedSharding(mesh, P("data")))))
  z = logits if subset is None else logits[:, list(subset)]
  pred, y, mask = z.argmax(-1), batch["label"], batch["mask"]
  assert int(got["correct"]) == int(np.sum((pred == y) * mask)) and int(got["count"]) == 13
  loss = sum(ref.task_loss("sigmoid", z[i : i + 1], y[i : i + 1]) for i in range(13))
  assert c.loss == "sigmoid_xent"
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)
  if subset is None:
    valid = batch["real_valid"] * mask
    hits = batch["real_label"][np.arange(b), pred] * valid
    assert int(got["real_correct"]) == int(hits.sum()) and int(got["real_count"]) == valid.sum()
    assert 0 < hits.sum() < valid.sum()  # a crafted batch with hits and misses
