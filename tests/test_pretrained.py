"""config.init_from checked before anything compiles and named on the start line; --check_only's
data line; a failed start's empty workdir removed (issue 30). No TensorFlow, no training."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default as default_config
from pf_jax import config_validation
from pf_jax import experiment
from pf_jax import models
from pf_jax import preflight
from pf_jax import pretrained
from pf_jax import workdir as workdir_lib
from tests import forked_main


def save_run(workdir, model: str, image_size: int, seed: int = 1, step: int = 3):
  """A workdir whose checkpoint holds `model`'s variables (10 classes) at `step`, as a run's."""
  net = models.build_model(model, num_classes=10)
  variables = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)))
  tree = {"step": jnp.int32(step), "params": variables["params"]}
  if "batch_stats" in variables:
    tree["batch_stats"] = variables["batch_stats"]
  path = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(path, item_handlers=ocp.StandardCheckpointHandler()) as mngr:
    mngr.save(step, args=ocp.args.StandardSave(tree))
    mngr.wait_until_finished()
  return jax.tree.map(np.asarray, variables)


def test_load_takes_every_leaf_but_the_head_and_says_what(tmp_path):
  """vit_digits weights of another seed: every parameter but the head is the checkpoint's, the
  head is the fresh state's, and the summary counts what was loaded (counted here from the
  saved tree: every leaf outside 'head')."""
  saved = save_run(str(tmp_path), "vit_digits", 8)
  c = default_config.get_config()
  exp = experiment.build(c, num_classes=10, num_train_examples=1438, num_devices=1)
  fresh = exp.init_state()
  state, summary = pretrained.load(exp, fresh, str(tmp_path))
  body = {k: v for k, v in saved["params"].items() if k != "head"}
  jax.tree.map(np.testing.assert_array_equal, {k: state.params[k] for k in body}, body)
  jax.tree.map(np.testing.assert_array_equal, state.params["head"], fresh.params["head"])
  leaves = jax.tree.leaves(body)
  # embedding 2, positions 1, 2 blocks x (2 norms x 2, q/k/v/out x 2, mlp 2 x 2), final norm 2.
  assert len(leaves) == 2 + 1 + 2 * (4 + 8 + 4) + 2 == 37
  count = sum(x.size for x in leaves)
  # By hand: patch 2 on 3 channels, width 64, 16 tokens, depth 2, mlp 128; no head.
  d, mlp = 64, 128
  block = 2 * (2 * d) + 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
  assert count == (2 * 2 * 3 * d + d) + 16 * d + 2 * block + 2 * d == 68_928
  assert summary == (
    f"weights from {tmp_path} (the step-3 checkpoint of a pf_jax run): 37 arrays, "
    f"{count / 1e3:.1f}k parameters; the head freshly initialized"
  )


@pytest.mark.parametrize(
  "overrides,message",
  [
    # vit_digits' width 64 against vit_ti4's 128.
    (dict(model="vit_ti4", image_size=32), "has shape (64,) there, vit_ti4 needs (128,)"),
    # a ViT's weights for a ResNet: none of its blocks.
    (dict(model="resnet_tiny"), "params/BasicBlock_0 is missing there"),
  ],
)
def test_check_refuses_another_models_weights_in_one_line(tmp_path, overrides, message):
  save_run(str(tmp_path), "vit_digits", 8)
  c = default_config.get_config()
  c.init_from = str(tmp_path)
  for k, v in overrides.items():
    c[k] = v
  with pytest.raises(config_validation.ConfigError) as e:
    pretrained.check(c, num_classes=10)
  text = str(e.value)
  want = f"config.init_from: '{tmp_path}' — weights that fit config.model='{c.model}'; "
  assert text.startswith(want) and message in text and "\n" not in text, text


def test_missing_data_names_the_field_the_directory_and_how(tmp_path):
  """ImageNet without its data: the training set first, then (once it is there) the first
  evaluation set; digits (prepared by the run itself) is never reported."""
  c = default_config.get_config()
  c.data_dir = str(tmp_path)
  assert preflight.missing_data(c) is None  # digits
  c.dataset, c.eval_datasets = "imagenet2012", ("imagenet2012", "imagenet2012_real", "imagenet_r")
  line = preflight.missing_data(c)
  assert line.startswith(
    f"config.dataset: 'imagenet2012' — not prepared in {tmp_path} "
    f"(config.data_dir='{tmp_path}') (also not prepared: imagenet2012_real, imagenet_r). "
    "How to prepare it: ImageNet needs a manual download"
  ), line
  assert f"`tfds build imagenet2012 --data_dir={tmp_path}`" in line and "\n" not in line
  prepared = tmp_path / "imagenet2012" / "5.1.0"
  prepared.mkdir(parents=True)
  (prepared / "dataset_info.json").write_text("{}")
  line = preflight.missing_data(c)
  assert line.startswith("config.eval_datasets: 'imagenet2012_real' — not prepared in"), line
  c.data_dir = "gs://bucket/data"  # not looked at
  assert preflight.missing_data(c) is None


def test_a_failed_start_removes_only_the_workdir_it_created(tmp_path):
  workdir = tmp_path / "new" / "run"
  top = workdir_lib.first_missing(str(workdir))
  assert top == str(tmp_path / "new")
  workdir.mkdir(parents=True)
  (workdir / workdir_lib.LOCK_FILE).write_text("{}")
  workdir_lib.remove_if_unused(top, str(workdir))
  assert os.listdir(tmp_path) == []  # both levels it created are gone
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text("{}")  # the run wrote something: kept
  workdir_lib.remove_if_unused(top, str(workdir))
  assert os.listdir(workdir) == ["config.json"]
  assert workdir_lib.first_missing(str(workdir)) is None  # existed before: never removed


@pytest.fixture(scope="module")
def main_py():
  """`main_py(args)`: `python main.py *args` with JAX_LOG_COMPILES=1 (tests/forked_main.py)."""
  with forked_main.MainServer(dict(os.environ, JAX_LOG_COMPILES="1")) as server:
    yield server.run


def test_check_only_reads_init_from_and_compiles_nothing(main_py, tmp_path):
  """--check_only said "config OK" for another model's weights, and the run failed later on the
  shapes. Now it names what a run would load, or the first key that does not fit (one line)."""
  save_run(str(tmp_path), "vit_digits", 8)
  r = main_py(["--check_only", f"--config.init_from={tmp_path}"])
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[-1] == (
    f"init_from: weights from {tmp_path} (the step-3 checkpoint of a pf_jax run): 37 arrays, "
    "68.9k parameters; the head freshly initialized"
  )
  r = main_py(["--check_only", f"--config.init_from={tmp_path}", "--config.model=resnet_tiny"])
  assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
    f"error: config.init_from: '{tmp_path}' — weights that fit config.model='resnet_tiny'; "
    "params/BasicBlock_0 is missing there"
  ), r.stderr
  # JAX_LOG_COMPILES logs the model's init traced by jax.eval_shape, but nothing compiled.
  assert not [l for l in r.stderr.splitlines() if "ompil" in l], r.stderr


def test_check_only_says_that_imagenet_is_missing(main_py, tmp_path):
  r = main_py(
    [
      "--check_only",
      "--config=configs/vit_s32_imagenet.py:sam_obf",
      f"--config.data_dir={tmp_path}",
    ]
  )
  assert r.returncode == 0 and r.stdout.startswith("config OK\n"), r.stderr
  data = [l for l in r.stdout.splitlines() if l.startswith("data: ")]
  assert len(data) == 1 and data[0].startswith(
    f"data: config.dataset: 'imagenet2012' — not prepared in {tmp_path} "
  ), r.stdout
  assert "ILSVRC2012_img_train.tar" in data[0]
