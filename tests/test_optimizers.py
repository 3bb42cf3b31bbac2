"""Losses, schedules, SGDW/AdamW masks and shrink-and-perturb against hand-computed numbers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pf_jax


def test_softmax_cross_entropy_with_smoothing_by_hand():
  z = jnp.array([[2.0, 0.0]])
  log_p = np.log(np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum())
  # target (1 - 0.2) * [1, 0] + 0.2 / 2 = [0.9, 0.1]
  want = -(0.9 * log_p[0] + 0.1 * log_p[1])
  assert float(pf_jax.softmax_cross_entropy(z, jnp.array([0]), 0.2)) == pytest.approx(
    want, rel=1e-6
  )


def test_sigmoid_cross_entropy_sums_classes_and_averages_batch():
  z = jnp.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
  y = jnp.array([2, 0])
  sig = lambda v: 1 / (1 + np.exp(-v))
  ex0 = -np.log(1 - sig(1.0)) - np.log(1 - sig(-2.0)) - np.log(sig(0.5))
  ex1 = 3 * np.log(2.0)
  assert float(pf_jax.sigmoid_cross_entropy(z, y)) == pytest.approx((ex0 + ex1) / 2, rel=1e-6)
  with pytest.raises(ValueError, match="label_smoothing"):
    pf_jax.sigmoid_cross_entropy(z, y, 1.0)
  with pytest.raises(ValueError, match="loss"):
    pf_jax.get_loss("hinge")


def test_warmup_linear_decay_and_lr_proportional_rho():
  lr = pf_jax.warmup_linear_decay(1.6, 0.016, warmup_steps=10, total_steps=110)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.8)
  assert float(lr(10)) == pytest.approx(1.6)
  assert float(lr(60)) == pytest.approx((1.6 + 0.016) / 2)
  assert float(lr(110)) == pytest.approx(0.016)
  rho = pf_jax.lr_proportional_rho(lr, 1.6, 0.016, rho_max=0.04, rho_min=0.02)
  assert float(rho(10)) == pytest.approx(0.04)  # peak lr -> rho_max
  assert float(rho(110)) == pytest.approx(0.02)  # final lr -> rho_min
  assert float(rho(60)) == pytest.approx(0.03)
  # step 0: lr = 0 < lr_min -> 0.02 - 0.016 / 1.584 * 0.02, clipped at 0 if negative
  assert float(rho(0)) == pytest.approx(0.02 - 0.016 / 1.584 * 0.02)
  vit = pf_jax.lr_proportional_rho(
    pf_jax.warmup_linear_decay(3e-3, 3e-5, 10, 100), 3e-3, 3e-5, 0.6, 0.0
  )
  assert float(vit(0)) == 0.0  # max(0, negative)
  with pytest.raises(ValueError, match="lr_max"):
    pf_jax.lr_proportional_rho(lr, 1.0, 1.0, 0.1, 0.0)


def test_weight_decay_mask():
  params = {
    "embed": {"kernel": jnp.ones((2, 2, 3, 4)), "bias": jnp.ones(4)},
    "pos_embedding": jnp.ones((1, 4, 4)),
    "norm": {"scale": jnp.ones(4)},
    "head": {"kernel": jnp.ones((4, 2))},
    # flax attention's [heads, head_dim] bias: a bias (timm's qkv.bias), so no decay.
    "query": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))},
  }
  mask = pf_jax.weight_decay_mask(params)
  assert mask == {
    "embed": {"kernel": True, "bias": False},
    "pos_embedding": False,
    "norm": {"scale": False},
    "head": {"kernel": True},
    "query": {"kernel": True, "bias": False},
  }


def test_sgdw_two_steps_by_hand():
  params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([0.5])}
  g = {"w": jnp.array([[0.1, 0.2]]), "b": jnp.array([1.0])}
  tx = pf_jax.sgdw(0.1, momentum=0.9, weight_decay=0.01)
  state = tx.init(params)
  u1, state = tx.update(g, state, params)
  # v1 = g; w: -0.1 * (g + 0.01 w); b (1-D, no decay): -0.1 * g
  np.testing.assert_allclose(u1["w"], [[-0.1 * (0.1 + 0.01), -0.1 * (0.2 - 0.02)]], rtol=1e-6)
  np.testing.assert_allclose(u1["b"], [-0.1], rtol=1e-6)
  p1 = optax.apply_updates(params, u1)
  u2, _ = tx.update(g, state, p1)
  # v2 = 0.9 g + g = 1.9 g; decay uses the current params p1
  np.testing.assert_allclose(
    u2["w"], -0.1 * (1.9 * np.array([[0.1, 0.2]]) + 0.01 * np.asarray(p1["w"])), rtol=1e-6
  )
  np.testing.assert_allclose(u2["b"], [-0.19], rtol=1e-6)


def test_adamw_decay_is_decoupled_and_masked():
  params = {"w": jnp.array([[2.0]]), "b": jnp.array([2.0])}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = pf_jax.adamw(0.1, weight_decay=0.5)
  u, _ = tx.update(zero, tx.init(params), params)  # zero gradient: only decay moves w
  np.testing.assert_allclose(u["w"], [[-0.1 * 0.5 * 2.0]], rtol=1e-6)
  np.testing.assert_allclose(u["b"], [0.0], atol=1e-12)


def test_obf_states_its_predictions():
  """OBF's p = softmax(z) or sigmoid(z) must match the task loss: passed, never assumed."""
  with pytest.raises(TypeError, match="predictions"):
    pf_jax.obf(0.1, 1.0)
  with pytest.raises(TypeError, match="predictions"):
    pf_jax.obf_fixed_alpha(0.5)


def test_base_optimizers_state_their_decay():
  """What decides the optimization is passed, not assumed: weight decay (and SGD's momentum)."""
  with pytest.raises(TypeError, match="weight_decay"):
    pf_jax.adamw(0.1)
  with pytest.raises(TypeError, match="momentum"):
    pf_jax.sgdw(0.1, weight_decay=0.0)


def test_shrink_and_perturb_by_hand():
  """theta <- (1 - f_t) theta + f_t theta_0 with f_t = factor * lr_t / lr_max, leaf by leaf."""
  lr = lambda step: 0.25 * (step + 1)  # lr_t: 0.25, 0.5, ...; lr_max = 1.0
  shrink = pf_jax.shrink_and_perturb(0.2, lr, lr_max=1.0)
  tree = {"w": jnp.array([1.0, 3.0]), "bn": {"mean": jnp.array([-2.0])}}
  tree0 = {"w": jnp.array([0.0, 1.0]), "bn": {"mean": jnp.array([2.0])}}
  got = shrink(tree, tree0, 1)  # f = 0.2 * 0.5 / 1.0 = 0.1
  np.testing.assert_allclose(got["w"], [0.9, 2.8], rtol=1e-6)
  np.testing.assert_allclose(got["bn"]["mean"], [-1.6], rtol=1e-6)
  const = pf_jax.shrink_and_perturb(0.5, 0.1)  # a constant lr is its own lr_max: f = 0.5
  np.testing.assert_allclose(const(tree, tree0, 7)["w"], [0.5, 2.0], rtol=1e-6)
  with pytest.raises(ValueError, match="factor"):
    pf_jax.shrink_and_perturb(2.0, 0.1)
  with pytest.raises(ValueError, match="lr_max"):
    pf_jax.shrink_and_perturb(0.1, lr)


class SmallBNCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(3)(x)


def test_batchnorm_statistics_come_from_the_unperturbed_pass():
  model = SmallBNCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 2))
  y = jnp.arange(8) % 3
  variables = model.init(jax.random.PRNGKey(1), x, train=False)
  params, stats = variables["params"], variables["batch_stats"]

  def apply_fn(p, inputs):  # train mode: batch statistics of the chunk; new running stats as aux
    logits, new = model.apply(
      {"params": p, "batch_stats": stats}, inputs, train=True, mutable=["batch_stats"]
    )
    return logits, new["batch_stats"]

  def sam_grad(m):
    forward = lambda p, batch: apply_fn(p, batch[0])
    spec = pf_jax.SamSpec(rho=0.5, m=m)
    fn = pf_jax.sam_value_and_grad(forward, pf_jax.softmax_cross_entropy, spec, has_aux=True)
    (_, new_stats, metrics), grads = fn(params, (x, y))
    return grads, new_stats, metrics

  grads, new_stats, metrics = sam_grad(None)
  # Running statistics as a plain forward pass at theta computes them: 0.9 * old + 0.1 * batch mean.
  _, want = apply_fn(params, x)
  batch_mean = jnp.mean(nn.Conv(4, (3, 3)).apply({"params": params["Conv_0"]}, x), axis=(0, 1, 2))
  np.testing.assert_allclose(want["BatchNorm_0"]["mean"], 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    new_stats["BatchNorm_0"]["mean"], want["BatchNorm_0"]["mean"], rtol=1e-6
  )
  np.testing.assert_allclose(new_stats["BatchNorm_0"]["var"], want["BatchNorm_0"]["var"], rtol=1e-6)
  # ...and not from the perturbed pass (whose batch statistics differ).
  perturbed = jax.tree.map(lambda p, g: p + 0.5 * g / optax.tree.norm(grads), params, grads)
  _, other = apply_fn(perturbed, x)
  assert not np.allclose(other["BatchNorm_0"]["mean"], new_stats["BatchNorm_0"]["mean"])
  assert float(metrics["loss"]) == pytest.approx(
    float(pf_jax.softmax_cross_entropy(apply_fn(params, x)[0], y))
  )
  # With m = 4 the statistics are the mean of the two chunks' updates.
  _, chunked, _ = sam_grad(4)
  halves = [apply_fn(params, x[:4])[1], apply_fn(params, x[4:])[1]]
  np.testing.assert_allclose(
    chunked["BatchNorm_0"]["mean"],
    (halves[0]["BatchNorm_0"]["mean"] + halves[1]["BatchNorm_0"]["mean"]) / 2,
    rtol=1e-5,
  )
