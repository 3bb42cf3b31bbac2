"""The Python examples of README.md and docs/ run as pasted and agree with a sequential
re-implementation; every Python block there is such an example; their links stay inside the
repository; docs/sam-family.md names what the code has."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pf_jax
from pf_jax import perturbations
from pf_jax import sam_family
from tests import reference as ref

ROOT = pathlib.Path(__file__).parents[1]
DOCS = [
  "README.md",
  "launch/README.md",
  *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md")),
]
# Each executed example, by the name in its `<!-- example:NAME -->` marker.
EXAMPLES = ("nnx", "regression", "linen", "shard_map", "pmap", "timm")


def _example(name: str) -> dict:
  """Runs the documentation block `name` exactly as written; returns its globals."""
  pattern = rf"<!-- example:{name} -->\s*```python\n(.*?)```"
  found = [(d, m) for d in DOCS if (m := re.search(pattern, (ROOT / d).read_text(), re.S))]
  assert len(found) == 1, (name, [d for d, _ in found])
  doc, match = found[0]
  scope = {}
  exec(compile(match.group(1), f"{doc}[{name}]", "exec"), scope)
  return scope


def test_every_python_block_is_an_executed_example():
  """A Python block in the docs is either run by a test here or not there at all."""
  for doc in DOCS:
    text = (ROOT / doc).read_text()
    blocks = len(re.findall(r"^```python$", text, re.M))
    names = re.findall(r"<!-- example:(\w+) -->\s*```python\n", text)
    assert blocks == len(names), (doc, blocks, names)
    assert set(names) <= set(EXAMPLES), (doc, names)


def _sequential_sam_grad(loss_at, params, chunks, rho, ascent_at=None):
  """A plain re-implementation of steepest/objective SAM: per chunk, ascend, move, differentiate;
  then the mean over chunks (the design page, steps 1-5)."""
  grads = []
  for chunk in chunks:
    g_p = jax.grad(ascent_at or loss_at)(params, chunk)
    norm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(g_p)))
    moved = jax.tree.map(lambda p, g, n=norm: p + rho * g / (n + 1e-12), params, g_p)
    grads.append(jax.grad(loss_at)(moved, chunk))
  return jax.tree.map(lambda *g: sum(g) / len(g), *grads)


def _assert_close(got, want, tol=1e-6):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol * 1e-2)


def test_readme_regression_example_trains():
  """A regression model trained through pf_jax.sam as the README shows: its first step is
  -lr * the sequential SAM gradient of its MSE, and its loss falls (before, update() assumed
  softmax cross-entropy and a regression stayed where it started)."""
  ex = _example("regression")
  forward, mse, batch = ex["forward"], ex["mse"], ex["batch"]
  params = {"w": jnp.zeros(8), "b": jnp.zeros(())}
  loss_at = lambda p, b: mse(forward(p, b), b)
  first, _, loss0 = ex["train_step"](params, ex["tx"].init(params), batch)
  g = _sequential_sam_grad(loss_at, params, [batch], rho=0.05)
  _assert_close(first, jax.tree.map(lambda p, gi: p - 0.05 * gi, params, g), 1e-5)
  final = float(loss_at(ex["params"], batch))
  assert float(loss0) == pytest.approx(float(loss_at(params, batch)))
  assert final < 0.01 * float(loss0), (float(loss0), final)


def test_sam_needs_the_task_loss():
  """pf_jax.sam states the task loss where the method is set up; a missing or wrong one is
  refused with a message saying what to pass."""
  spec = pf_jax.SamSpec(rho=0.05)
  with pytest.raises(TypeError, match="needs loss_fn=, the task loss"):
    pf_jax.sam(optax.sgd(0.1), spec)
  with pytest.raises(TypeError, match="needs loss_fn="):
    pf_jax.sam(optax.sgd(0.1), spec, "softmax_xent")
  with pytest.raises(TypeError, match="spec must be a pf_jax.SamSpec"):
    pf_jax.sam(optax.sgd(0.1), 0.05, pf_jax.softmax_cross_entropy)
  params, batch = {"w": jnp.ones((3, 2))}, (jnp.ones((4, 3)), jnp.arange(4) % 2)
  forward = lambda p, b: b[0] @ p["w"]
  per_example = lambda logits, b: jnp.sum(logits, axis=-1)
  tx = pf_jax.sam(optax.sgd(0.1), spec, per_example)
  with pytest.raises(ValueError, match="must return a scalar mean, got shape \\(4,\\)"):
    tx.update(params, tx.init(params), params, forward=forward, batch=batch)
  tx = pf_jax.sam(optax.sgd(0.1), spec, pf_jax.softmax_cross_entropy)
  with pytest.raises(TypeError, match="takes no loss_fn: the task loss is set once"):
    tx.update(params, tx.init(params), params, forward=forward, batch=batch, loss_fn=per_example)
  with pytest.raises(TypeError, match="needs forward= and batch=.*pf_jax.TrainState"):
    tx.update(params, tx.init(params), params)


def test_classification_losses_refuse_regression_targets():
  """Softmax over one output is constant and float targets [B] are not classes: both refused."""
  out, y = jnp.ones((4, 1)), jnp.arange(4.0)
  with pytest.raises(ValueError, match="softmax_cross_entropy is a classification loss"):
    pf_jax.softmax_cross_entropy(out, (None, y))
  with pytest.raises(ValueError, match="sigmoid_cross_entropy is a classification loss"):
    pf_jax.sigmoid_cross_entropy(out, y)
  with pytest.raises(ValueError, match="for regression pass your own loss"):
    pf_jax.softmax_cross_entropy(jnp.ones((4, 3)), y)


def test_perturbed_logits_refuses_a_tuple_forward():
  params, batch = {"w": jnp.ones((3, 2))}, (jnp.ones((4, 3)), jnp.arange(4) % 2)
  forward = lambda p, b: (b[0] @ p["w"], {})
  spec = pf_jax.SamSpec(rho=0.05, objective=pf_jax.obf(0.5, 1.0, "softmax"))
  with pytest.raises(TypeError, match="forward returned a tuple of 2; it must return the logits"):
    pf_jax.perturbed_logits(forward, pf_jax.softmax_cross_entropy, spec, params, batch)


def test_plain_flax_train_state_names_the_call_to_use():
  """Flax's own TrainState cannot pass forward/batch on: the error names pf_jax.TrainState."""
  from flax.training import train_state

  params, batch = {"w": jnp.ones((3, 2))}, (jnp.ones((4, 3)), jnp.arange(4) % 2)
  forward = lambda p, b: b[0] @ p["w"]
  tx = pf_jax.sam(optax.sgd(0.1), pf_jax.SamSpec(rho=0.05), pf_jax.softmax_cross_entropy)
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  with pytest.raises(TypeError, match="state.apply_gradients\\(grads=grads, forward=forward"):
    state.apply_gradients(grads=params, forward=forward, batch=batch)


def test_readme_linen_batchnorm_example():
  with jax.enable_x64(True):
    ex = _example("linen")
    model, batch = ex["model"], ex["batch"]
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), ex["variables"])  # Flax: float32
    params = variables["params"]
    state = ex["TrainState"].create(
      apply_fn=model.apply, params=params, tx=ex["tx"], batch_stats=variables["batch_stats"]
    )
    state, _ = ex["train_step"](state, batch)
    new_params, new_stats = state.params, state.batch_stats

    def loss_at(p, b):  # train mode: the chunk's own batch statistics
      logits, _ = model.apply(
        {**variables, "params": p}, b["image"], train=True, mutable=["batch_stats"]
      )
      return pf_jax.softmax_cross_entropy(logits, b["label"])

    g = _sequential_sam_grad(loss_at, params, [batch], rho=0.05)
    # First SGD-momentum step: -lr * g. Running statistics: those of the pass at theta.
    _assert_close(new_params, jax.tree.map(lambda p, gi: p - 0.1 * gi, params, g))
    _, want_stats = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    _assert_close(new_stats, want_stats["batch_stats"], 1e-12)


def test_readme_nnx_example():
  with jax.enable_x64(True):
    ex = _example("nnx")
    model = ex["MLP"](nnx.Rngs(0))  # the example's model before training, in float64
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    optimizer = nnx.Optimizer(model, ex["tx"], wrt=nnx.Param)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    x, y = ex["batch"]
    assert x.dtype == jnp.float64
    ex["train_step"](model, optimizer, ex["batch"])

    def logits_at(p, b):
      return nnx.merge(graphdef, nnx.State(p))(b[0])

    def obf_at(p, b):  # the OBF ascent objective from the NumPy reference's logit gradient
      dz = ref.obf_dz(np.asarray(logits_at(params, b)), np.asarray(b[1]), "softmax", 0.1, 1.0)
      return jnp.sum(jnp.asarray(dz) * logits_at(p, b))

    loss_at = lambda p, b: pf_jax.softmax_cross_entropy(logits_at(p, b), b[1])
    chunks = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    g = _sequential_sam_grad(loss_at, params, chunks, rho=0.1, ascent_at=obf_at)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _assert_close(got, jax.tree.map(lambda p, gi: p - 0.1 * gi, params, g))


@pytest.mark.parametrize("name", ["shard_map", "pmap"])
def test_readme_data_parallel_examples(name):
  """The example's own step with a transparent base (SGD, lr 1: updates = -SAM gradient) against
  the sequential reference over the devices' shards (8 simulated devices)."""
  with jax.enable_x64(True):
    ex = _example(name)
    forward, loss_fn = ex["forward"], ex["loss_fn"]
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 10))), "b": jnp.zeros(10)}
    x, y = jnp.asarray(rng.normal(size=(64, 16))), jnp.asarray(rng.integers(0, 10, 64))
    spec = pf_jax.SamSpec(rho=0.05)
    if name == "shard_map":
      ex["tx"] = tx = pf_jax.sam(optax.sgd(1.0), spec, loss_fn, axis_name="data")
      mesh = ex["mesh"]
      step = jax.jit(
        jax.shard_map(ex["step"], mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P()))
      )
      new, _ = step(params, tx.init(params), jax.device_put((x, y), NamedSharding(mesh, P("data"))))
    else:
      ex["tx"] = tx = pf_jax.sam(
        optax.sgd(1.0), spec, loss_fn, axis_name="batch", updates_are_ascent=True
      )
      step = jax.pmap(ex["step"], axis_name="batch", in_axes=(None, None, 0, 0), out_axes=None)
      new, _ = step(params, tx.init(params), x.reshape(8, 8, 16), y.reshape(8, 8))
    loss_at = lambda p, b: loss_fn(forward(p, b), b)
    chunks = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    g = _sequential_sam_grad(loss_at, params, chunks, rho=0.05)
    _assert_close(new, jax.tree.map(lambda p, gi: p - gi, params, g))


def _paths(text):
  """Markdown link targets and `backticked` strings that look like files of the repository."""
  links = [link.split("#")[0] for link in re.findall(r"\]\(([^)]+)\)", text)]
  ticked = [t for t in re.findall(r"`([^`\s]+)`", text) if re.search(r"\.(py|md)$", t)]
  return links + ticked


def test_timm_checkpoint_example_gives_timms_logits():
  """docs/fidelity.md's snippet: a timm ViT-S/32 checkpoint read, converted and run in pf_jax
  (NHWC, train=False) gives timm's own logits of the same images (skips without torch/timm)."""
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  ex = _example("timm")
  logits, want = ex["logits"], ex["timm_logits"]
  assert logits.shape == want.shape == (2, 10)
  assert np.abs(logits - want).max() <= 1e-4 * np.abs(want).max(), (logits, want)


def test_readme_links_stay_in_the_repository():
  for doc in DOCS:
    base = (ROOT / doc).parent
    for target in _paths((ROOT / doc).read_text()):
      assert "://" not in target and not target.startswith("/"), (doc, target)
      path = (
        (base / target).resolve() if not (ROOT / target).exists() else (ROOT / target).resolve()
      )
      assert path.is_relative_to(ROOT), (doc, target)
      assert path.exists(), (doc, target)
  readme = (ROOT / "README.md").read_text()
  for page in ROOT.glob("docs/*.md"):  # README is the front door to every page
    assert f"(docs/{page.name})" in readme, page.name
  assert len(readme.splitlines()) <= 200  # the front door; the rest lives in docs/


def test_sam_family_doc_matches_the_code():
  """The page names the library's modes and entry points as they are spelled in the code."""
  text = (ROOT / "docs" / "sam-family.md").read_text()
  for mode in sam_family.ASAM_MODES + sam_family.CHUNK_MODES + perturbations.OBJECTIVE_NAMES:
    assert f'"{mode}"' in text, mode
  for name in (
    "sam",
    "sam_value_and_grad",
    "SamSpec",
    "obf",
    "obf_fixed_alpha",
    "lr_proportional_rho",
    "adamw",
    "sgdw",
    "shrink_and_perturb",
    "warmup_linear_decay",
  ):
    assert f"pf_jax.{name}" in text and hasattr(pf_jax, name), name
  for arg in (
    "objective",
    "asam",
    "asam_eta",
    "rho",
    "gsam_alpha",
    "gsam_normalized_backup",
    "loss_fn",
  ):
    assert f"`{arg}=`" in text or f"{arg}=" in text, arg
  assert f"eps = {sam_family.EPS:g}" in text
