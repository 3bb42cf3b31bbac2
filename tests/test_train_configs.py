"""Every paper config (configs/*.py) trains end to end in its local variant.

For each (config file, method) the local variant (tiny model, batch 16, 32x32 images) builds its
model, optimizer and input pipeline and runs `train_and_evaluate` for 2 train steps + 1 evaluation
on the full config's datasets (ImageNet and its eval sets, CIFAR) through `tfds.testing.mock_data`
(random examples generated from the TFDS builders' feature specs, offline). `test_local_variant_
runs_offline` (slow) runs every local variant as a user does: on the embedded digits, no mock. Checked: a top-1 in
[0, 1] for every eval dataset (and ReaL top-1 for imagenet2012_real), and a checkpoint at step 2.
`cifar_finetune` runs start from (`init_from`) the local ImageNet run of the same model.

Cost is compilation, so these runs are `slow`: DEFAULT covers each perturbation / model / loss /
finetuning code path once, `-m slow` runs it and every other method of every file. The default
suite checks every row's method and training step against an independent reference instead
(tests/test_train_reference.py). Runs share the test session's persistent XLA compilation cache
(tests/conftest.py): the local variants of vit_s16 / resnet101 are the same programs as those of
vit_s32 / resnet50, and all eval steps of one model are identical, so they compile once.
"""

import contextlib
import importlib.util
import math
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from pf_jax import checkpointing
from pf_jax import config_validation
from pf_jax import experiment
from pf_jax import input_pipeline
from pf_jax import models
from pf_jax import train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
NUM_MOCK_EXAMPLES = 20  # eval: one full batch of 16 + one padded; train: batch 2 crosses an epoch


def load(name):
  spec = importlib.util.spec_from_file_location(f"_train_cfg_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _all_args():
  """(config file, arg before ',local'): every method of every config."""
  out = []
  for name in ("vit_s32_imagenet", "vit_s16_imagenet", "resnet50_imagenet", "resnet101_imagenet"):
    out += [(name, m) for m in load(name).METHODS]
  ft = load("cifar_finetune")
  out += [
    ("cifar_finetune", f"{model},{ds},{m}")
    for model in ft.MODELS
    for ds in ft.NUM_CLASSES
    for m in ft.methods(model, ft.NUM_CLASSES[ds])
  ]
  # The local variant keeps m only if it divides its batch of 16 (larger m become 4): one run
  # per distinct local m.
  sweep = load("cifar10_msweep")
  local_m = sorted({sweep.get_config(f"obf,{m},local").sam.m for m in sweep.M_VALUES})
  out += [("cifar10_msweep", f"{p},{m}") for p in sweep.PERTURBATIONS for m in local_m]
  return out


ALL = _all_args()

# Default subset: every config file runs, and together they cover each code path once.
# Local variants: per-device batch 2, sam.m = 4 (a chunk spans a pair of devices).
DEFAULT = [
  # OBF objective, ViT, sigmoid BCE, AdamW + clipping; 5 eval sets incl. ReaL and ImageNet-R.
  ("vit_s32_imagenet", "sam_obf"),
  # No perturbation (plain AdamW) + label smoothing (of the sigmoid loss).
  ("vit_s32_imagenet", "label_smooth"),
  # GSAM with the normalized backup + OBF on the ViT.
  ("vit_s16_imagenet", "gsam_obf"),
  # ResNet (BatchNorm), SGDW, softmax CE, ASAM ("before") + OBF with gamma = 1e-12.
  ("resnet50_imagenet", "asam_obf"),
  # Steepest ascent + GSAM (normalized backup), lr-proportional rho.
  ("resnet101_imagenet", "gsam_steep"),
  # Random perturbation (per-step, per-chunk keys).
  ("resnet50_imagenet", "random"),
  # Finetuning from the resnet50 run above (init_from, BatchNorm statistics, new 100-way head).
  ("cifar_finetune", "resnet50,cifar100,sam_steep"),
  # m = 1: two m-chunks per device (vmap), OBF with gamma = 0.
  ("cifar10_msweep", "obf_gamma0,1"),
]
# Slow only, among others: shrink_perturb (unit-tested in test_optimizers.py), the ViT variants
# of GSAM / ASAM / random, the fixed-alpha ablation, every other finetune and m-sweep run.
SLOW = [a for a in ALL if a not in DEFAULT]

# The local ImageNet run a cifar_finetune model starts from (both are in DEFAULT).
PRETRAINED = {
  "vit_s32": ("vit_s32_imagenet", "sam_obf"),
  "resnet50": ("resnet50_imagenet", "asam_obf"),
}


def _ids(args):
  return [f"{name}:{arg}" for name, arg in args]


def test_lists():
  assert set(DEFAULT) <= set(ALL) and len(set(ALL)) == len(ALL)
  assert {name for name, _ in DEFAULT} == {name for name, _ in ALL}


def _two_steps(c):
  """A local variant cut to 2 steps (1 of warmup), evaluated and checkpointed at the end."""
  c.num_train_steps = 2
  c.warmup_steps = 1
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2


class Runs:
  """Runs (config, method) once per module; finetuning runs start from PRETRAINED."""

  def __init__(self, root):
    self.root = root
    self.done = {}

  def config(self, name, arg, **overrides):
    """The local variant, but on the full config's (mocked) datasets."""
    c = load(name).get_config(arg + ",local")
    full = load(name).get_config(arg)
    c.dataset, c.eval_datasets = full.dataset, full.eval_datasets
    _two_steps(c)
    c.log_every_steps = 1
    c.eval_batch_size = 16
    c.data_dir = str(self.root / "tfds")
    for k, v in overrides.items():
      c[k] = v
    return c

  def get(self, name, arg):
    if (name, arg) not in self.done:
      overrides = {}
      if name == "cifar_finetune":
        overrides["init_from"] = self.get(*PRETRAINED[arg.split(",")[0]])[1]
      c = self.config(name, arg, **overrides)
      workdir = str(self.root / f"{name}-{arg.replace(',', '-')}")
      with tfds.testing.mock_data(
        num_examples=NUM_MOCK_EXAMPLES, data_dir=c.data_dir, policy=tfds.testing.MockPolicy.USE_CODE
      ):
        config_validation.validate(c, jax.device_count())
        metrics = train.train_and_evaluate(c, workdir)
      self.done[(name, arg)] = (c, workdir, metrics)
    return self.done[(name, arg)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(tmp_path_factory.mktemp("train_configs"))


def _check_run(c, workdir, metrics):
  expected = {f"eval/{ds}/{m}" for ds in c.eval_datasets for m in ("top1", "loss")}
  if "imagenet2012_real" in c.eval_datasets:
    expected.add("eval/imagenet2012_real/real_top1")
  assert set(metrics) == expected
  for key, value in metrics.items():  # top-1 a fraction, the loss a finite non-negative number
    assert math.isfinite(value) and 0.0 <= value <= (1.0 if "top1" in key else math.inf), (
      key,
      value,
    )
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    assert mngr.latest_step() == 2


# Each run trains through the whole loop (~20-90 s on 2 cores); the default suite checks every
# row's method mapping and step against an independent reference instead (test_train_reference).
@pytest.mark.slow
@pytest.mark.parametrize("name,arg", DEFAULT, ids=_ids(DEFAULT))
def test_config_trains(runs, name, arg):
  _check_run(*runs.get(name, arg))


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", SLOW, ids=_ids(SLOW))
def test_config_trains_all_methods(runs, name, arg):
  _check_run(*runs.get(name, arg))


def _restore_raw(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    return mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore())


def _without_head(tree):
  return {k: _without_head(v) if isinstance(v, dict) else v for k, v in tree.items() if k != "head"}


def _pretrained_workdir(runs, model):
  """A workdir holding a checkpoint of PRETRAINED[model]'s state, saved as training saves it, with
  every float leaf (BatchNorm statistics too) a random value, unlike any initialization."""
  c = runs.config(*PRETRAINED[model])
  num_classes = input_pipeline.DATASETS[c.dataset].num_classes
  exp = experiment.build(c, num_classes=num_classes, num_train_examples=64, num_devices=1)
  rng = np.random.default_rng(0)
  state = jax.tree.map(  # shapes only: nothing compiles
    lambda x: (
      rng.normal(size=x.shape).astype(x.dtype)
      if x.dtype.kind == "f"
      else np.zeros(x.shape, x.dtype)
    ),
    jax.eval_shape(exp.init_state),
  )
  workdir = runs.root / f"pretrained-{model}"
  with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
    checkpointing.save(mngr, 2, state, config=c)
    checkpointing.finish(mngr, 2)
  return str(workdir)


@pytest.mark.parametrize("model,dataset", [("vit_s32", "cifar10"), ("resnet50", "cifar100")])
def test_finetune_init_from(runs, model, dataset):
  """Finetuning starts from the ImageNet run's weights and statistics, with a new C-way head."""
  pretrained_dir = _pretrained_workdir(runs, model)
  pretrained = _restore_raw(pretrained_dir)
  num_classes = input_pipeline.DATASETS[dataset].num_classes
  c = runs.config("cifar_finetune", f"{model},{dataset},sam_obf", init_from=pretrained_dir)
  config_validation.validate(c, jax.device_count())
  exp = experiment.build(c, num_classes=num_classes, num_train_examples=64, num_devices=1)
  fresh = jax.device_get(jax.jit(exp.init_state)())
  state = train.load_pretrained(exp, fresh, pretrained_dir)
  assert int(state.step) == 0

  # Every non-head parameter (and BatchNorm statistic) is the ImageNet run's final value ...
  got = _without_head(state.params)
  want = _without_head(pretrained["params"])
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats, pretrained.get("batch_stats", {}))
  assert bool(state.batch_stats) == models.has_batch_norm(c.model)
  # ... and differs from a fresh initialization (the load did something).
  assert not all(
    np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_without_head(fresh.params)))
  )
  # The head is new: C outputs, initialized as a fresh model's head (not the 1000-way one).
  head = state.params["head"]
  assert pretrained["params"]["head"]["bias"].shape == (1000,)
  assert head["bias"].shape == (num_classes,) and head["kernel"].shape[-1] == num_classes
  jax.tree.map(np.testing.assert_array_equal, head, fresh.params["head"])
  np.testing.assert_array_equal(head["bias"], np.full(num_classes, c.head_bias_init, np.float32))


def _distinct_local_args():
  """(config file, arg) of every local variant, one per distinct resolved config."""
  seen, out = set(), []
  for name, arg in ALL + [
    ("cifar10_msweep", f"{p},{m}")
    for p in load("cifar10_msweep").PERTURBATIONS
    for m in load("cifar10_msweep").M_VALUES
  ]:
    key = load(name).get_config(arg + ",local").to_json()
    if key not in seen:
      seen.add(key)
      out.append((name, arg))
  return out


LOCAL = _distinct_local_args()


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", LOCAL, ids=_ids(LOCAL))
def test_local_variant_runs_offline(name, arg, tmp_path_factory):
  """`--config=configs/<name>.py:<arg>,local` as a user runs it: digits, built offline, no mock."""
  c = load(name).get_config(arg + ",local")
  assert c.dataset == "digits" and c.eval_datasets == ("digits",)
  with c.unlocked() if c.is_locked else contextlib.nullcontext():
    _two_steps(c)
    c.data_dir = str(tmp_path_factory.getbasetemp() / "digits_data")  # built once, shared
  workdir = str(tmp_path_factory.mktemp("local"))
  config_validation.validate(c, jax.device_count())
  _check_run(c, workdir, train.train_and_evaluate(c, workdir))
