"""Evaluation reads BatchNorm's running statistics; training updates them as timm does.

The evaluation step, the output-collection step and the sharpness tool must run the model in
inference mode: an example's logits are a function of that example alone (the running mean and
variance normalize it), never of its batch-mates. A hand-built model (BatchNorm, then a linear
head) with chosen running statistics gives the numbers in closed form. Training mode normalizes
with the batch's statistics and moves the running ones by PyTorch's momentum 0.1 (timm's
BatchNorm2d default; flax's `momentum=0.9` is the weight of the old value).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default as default_config
from pf_jax import experiment
from pf_jax import models
from pf_jax import train
from tests import reference as ref

# Compile without LLVM's expensive passes: the same numbers, compiled in a fraction of the time.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
EPS = 1e-5  # BatchNorm2d's eps (timm, PyTorch); the hand-built model uses the same
B, H, W, C, N = 16, 2, 2, 3, 6  # batch, image, classes


class _NormHead(nn.Module):
  """Per-feature BatchNorm of the flattened image, then a linear head."""

  num_classes: int
  affine: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape((x.shape[0], -1))
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=EPS,
      use_scale=self.affine,
      use_bias=self.affine,
      name="norm",
    )(x)
    return nn.Dense(self.num_classes, name="head")(x)


def _variables(rng, features, affine=True, classes=N):
  """Running statistics far from any batch's own (mean 3, variance 4..9), so using the batch's
  statistics instead changes every logit."""
  params = {
    "head": {
      "kernel": rng.normal(size=(features, classes)).astype(np.float32),
      "bias": rng.normal(size=classes).astype(np.float32),
    }
  }
  if affine:
    params["norm"] = {
      "scale": (1 + 0.2 * rng.normal(size=features)).astype(np.float32),
      "bias": (0.1 * rng.normal(size=features)).astype(np.float32),
    }
  stats = {
    "norm": {
      "mean": (3 + rng.normal(size=features)).astype(np.float32),
      "var": rng.uniform(4, 9, size=features).astype(np.float32),
    }
  }
  return params, stats


def _closed_form(params, stats, images):
  """Logits of `_NormHead` in inference mode, float64."""
  x = images.reshape(len(images), -1).astype(np.float64)
  s = stats["norm"]
  x = (x - s["mean"]) / np.sqrt(s["var"].astype(np.float64) + EPS)
  if "norm" in params:
    x = x * params["norm"]["scale"] + params["norm"]["bias"]
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def _exp_and_mesh():
  c = default_config.get_config()
  exp = experiment.build(c, num_classes=N, num_train_examples=1438, num_devices=8)
  exp = dataclasses.replace(exp, model=_NormHead(N), has_batch_norm=True)
  return exp, Mesh(np.asarray(jax.devices()), ("data",))


def _batches(rng):
  """Two batches sharing example 0: the second's batch-mates are far from the first's."""
  images = rng.normal(size=(B, H, W, C)).astype(np.float32)
  other = images.copy()
  other[1:] = 40 * rng.normal(size=(B - 1, H, W, C)) - 25
  labels = rng.integers(0, N, size=B).astype(np.int32)
  return images, other, labels


def test_eval_step_uses_running_statistics():
  """Loss and top-1 of the eval step (2 examples per device) equal the closed form over the
  running statistics; example 0's loss alone (the others masked) is the same whatever its
  batch-mates."""
  exp, mesh = _exp_and_mesh()
  rng = np.random.default_rng(0)
  params, stats = _variables(rng, H * W * C)
  images, other, labels = _batches(rng)
  step = train.make_eval_step(exp, mesh, None)
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))

  def run(images, mask):
    batch = {"image": images, "label": labels, "mask": mask}
    return jax.device_get(step(params, stats, {}, put(batch)))

  z = _closed_form(params, stats, images)
  got = run(images, np.ones(B, np.int32))
  assert exp.config.loss == "sigmoid_xent"
  want = sum(ref.task_loss("sigmoid", z[i : i + 1], labels[i : i + 1]) for i in range(B))
  np.testing.assert_allclose(got["loss"], want, rtol=1e-5)
  assert int(got["correct"]) == int(np.sum(z.argmax(-1) == labels))
  only_first = np.array([1] + [0] * (B - 1), np.int32)
  alone, with_others = run(images, only_first), run(other, only_first)
  np.testing.assert_allclose(alone["loss"], ref.task_loss("sigmoid", z[:1], labels[:1]), rtol=1e-5)
  np.testing.assert_allclose(with_others["loss"], alone["loss"], rtol=1e-6)


def test_collect_step_uses_running_statistics():
  """The collected softmax outputs of the unperturbed model are the closed form's, per example."""
  exp, mesh = _exp_and_mesh()
  exp = dataclasses.replace(exp, spec=dataclasses.replace(exp.spec, m=2))  # 2 per device
  rng = np.random.default_rng(1)
  params, stats = _variables(rng, H * W * C)
  images, other, labels = _batches(rng)
  step = train.make_collect_step(exp, mesh)
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
  assert exp.config.analysis.predictions == "softmax"
  for batch_images in (images, other):
    got = jax.device_get(step(params, stats, 0, put({"image": batch_images, "label": labels})))
    z = _closed_form(params, stats, batch_images)
    p = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(got["probs"], p / p.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)


def test_sharpness_uses_running_statistics(tmp_path, monkeypatch):
  """Hessian of the sigmoid loss of a linear head over BatchNorm-ed (running statistics) inputs:
  block-diagonal, H_c = mean_i s_ic (1 - s_ic) [xh_i; 1] [xh_i; 1]^T with xh the normalized
  inputs (as tests/test_analysis.py's linear model, on normalized features)."""
  from pf_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from pf_jax.analysis import sharpness  # pylint: disable=g-import-not-at-top
  from tests.test_analysis import _tiny_digits_config  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(
    models, "build_model", lambda name, **kw: _NormHead(kw["num_classes"], affine=False)
  )
  c = _tiny_digits_config("steepest", 4)
  c.data_dir = str(tmp_path / "data")
  assert c.loss == "sigmoid_xent" and c.label_smoothing == 0
  rng = np.random.default_rng(2)
  d = 8 * 8 * 3
  params, stats = _variables(rng, d, affine=False, classes=10)
  params["head"]["kernel"] *= 0.05
  params["head"]["bias"] = np.array([0.0] + [-4.0] * 9, np.float32)  # one dominant block
  stats["norm"]["mean"] = np.full(d, 5.0, np.float32)  # the digits' pixels are not centered here
  workdir = tmp_path / "run"
  with ocp.CheckpointManager(
    workdir / "checkpoints", options=ocp.CheckpointManagerOptions(create=True)
  ) as mngr:
    checkpointing.save(mngr, 3, {"step": jnp.int32(3), "params": params, "batch_stats": stats})
  workdir_lib.save_config(str(workdir), c)

  got = sharpness.checkpoint_sharpness(
    str(workdir), num_examples=128, batch_size=64, tol=1e-7, num_iters=300
  )
  images = sharpness.training_batches(c, 128, 64)["image"].reshape(128, d)
  xh = (images - stats["norm"]["mean"]) / np.sqrt(stats["norm"]["var"].astype(np.float64) + EPS)
  x1 = np.concatenate([xh, np.ones((128, 1))], axis=1)
  s = 1 / (1 + np.exp(-(xh @ params["head"]["kernel"] + params["head"]["bias"])))
  curv = s * (1 - s)
  top = max(np.linalg.eigvalsh((x1 * curv[:, [k]]).T @ x1 / 128)[-1] for k in range(10))
  np.testing.assert_allclose(got["sharpness"], top, rtol=1e-3)


def _at(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@pytest.mark.parametrize(
  "norm,norm_input",
  [("bn_init", "conv_init"), ("BasicBlock_1/norm_proj", "BasicBlock_1/conv_proj")],
)
def test_training_mode_normalizes_by_the_batch_and_moves_running_statistics_by_0_1(
  norm, norm_input
):
  """resnet_tiny in train mode: a BatchNorm's output is its input normalized by the batch's own
  mean and (biased) variance, and its running statistics become 0.9 old + 0.1 batch (PyTorch's
  momentum 0.1, timm's default; flax's biased variance: docs/fidelity.md)."""
  model = models.build_model("resnet_tiny", num_classes=N)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)  # values drawn here, not init
  old = jax.tree.map(lambda v: (1 + rng.random(v.shape)).astype(np.float32), shapes["batch_stats"])
  params = jax.tree.map(lambda v: rng.normal(size=v.shape).astype(np.float32), shapes["params"])
  params = jax.tree.map(lambda v: v * (0.3 if v.ndim > 1 else 1.0), params)
  apply = lambda v, x: model.apply(
    v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
  )
  variables = {"params": params, "batch_stats": old}
  _, state = jax.jit(apply).lower(variables, x).compile(_FAST_COMPILE)(variables, x)
  y = np.asarray(_at(state["intermediates"], norm_input)["__call__"][0], np.float64)
  mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
  new, before = _at(state["batch_stats"], norm), _at(old, norm)
  np.testing.assert_allclose(new["mean"], 0.9 * before["mean"] + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(new["var"], 0.9 * before["var"] + 0.1 * var, rtol=1e-5)
  p = _at(params, norm)
  want = (y - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]
  out = _at(state["intermediates"], norm)["__call__"][0]
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
