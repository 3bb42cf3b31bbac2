"""The PyTorch peer of the benchmark (benchmarks/torch_sam.py) computes the design page's
gradient: checked against the NumPy reference in float64. Skipped without torch (optional)."""

import sys

import numpy as np
import pytest

from tests import reference

# torch.optim imports dynamo, which imports triton; triton's LLVM aborts the process when
# TensorFlow's is already loaded (by other tests). The eager CPU peer never needs triton.
sys.modules.setdefault("triton", None)
torch = pytest.importorskip("torch")
torch_sam = pytest.importorskip("benchmarks.torch_sam")


class Mlp(torch.nn.Module):
  """reference.forward's z = W2 tanh(W1 x + b1) + b2, with the reference's parameters."""

  def __init__(self, p):
    super().__init__()
    for k in reference.KEYS:
      self.register_parameter(k, torch.nn.Parameter(torch.tensor(p[k], dtype=torch.float64)))

  def forward(self, x):
    return torch.tanh(x @ self.W1 + self.b1) @ self.W2 + self.b2


CASES = {
  "steepest": (dict(objective="steepest"), {}),
  "obf": (
    dict(objective="obf", obf_kw=dict(predictions="softmax", lam=0.1, gamma=1.0)),
    dict(objective=torch_sam.Obf(0.1, 1.0)),
  ),
  "obf_lam0_sigmoid_loss": (
    dict(objective="obf", obf_kw=dict(predictions="sigmoid", lam=0.0, gamma=0.5)),
    dict(objective=torch_sam.Obf(0.0, 0.5, "sigmoid")),
  ),
  "gsam": (dict(objective="steepest", xi=0.3), dict(gsam_alpha=0.3)),
  "gsam_normalized_obf": (
    dict(
      objective="obf",
      obf_kw=dict(predictions="softmax", lam=0.1, gamma=1.0),
      xi=0.4,
      norm_backup=True,
    ),
    dict(objective=torch_sam.Obf(0.1, 1.0), gsam_alpha=0.4, gsam_normalized_backup=True),
  ),
  "asam_before": (dict(objective="steepest", asam="before", eta=0.01), {}),
  "asam_after": (dict(objective="steepest", asam="after", eta=0.01), {}),
  "asam_both": (dict(objective="steepest", asam="both", eta=0.01), {}),
}


@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_peer_gradient_matches_the_reference(case, chunks):
  ref_kw, spec_kw = CASES[case]
  loss = "sigmoid" if "sigmoid_loss" in case else "softmax"
  rng = np.random.default_rng(0)
  p = reference.init_mlp(rng, 5, 7, 4)
  x = rng.normal(size=(16, 5))
  y = rng.integers(0, 4, size=16)
  m = 16 // chunks
  expected = reference.sam_grad(p, x, y, m, loss=loss, rho=0.3, **ref_kw)
  spec_kw = dict(spec_kw)
  for k in ("asam",):
    if k in ref_kw:
      spec_kw.update(asam=ref_kw["asam"], asam_eta=ref_kw["eta"])
  spec = torch_sam.Spec(rho=0.3, m=m, **spec_kw)
  model = Mlp(p)
  loss_fn = torch_sam.sigmoid_xent if loss == "sigmoid" else torch_sam.softmax_xent
  grads, _ = torch_sam.sam_gradient(
    model, loss_fn, torch.tensor(x), torch.tensor(y, dtype=torch.long), spec
  )
  for k, g in zip(reference.KEYS, grads):
    np.testing.assert_allclose(g.numpy(), expected[k], rtol=1e-10, atol=1e-12, err_msg=k)
  # theta is restored after the perturbation (up to rounding of theta + e - e).
  for k, param in zip(reference.KEYS, model.parameters()):
    np.testing.assert_allclose(param.detach().numpy(), p[k], rtol=0, atol=1e-14)


def test_torch_peer_step_runs_with_batch_norm_and_random():
  """A step with BatchNorm keeps the running statistics of the first pass only."""
  torch.manual_seed(0)
  model = torch.nn.Sequential(
    torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
  )
  opt = torch_sam.adamw(model, lr=1e-2)
  x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
  bn = model[1]
  with torch.no_grad():
    mean1, mean2 = model[0](x[:4]).mean(0), model[0](x[4:]).mean(0)
  torch_sam.sam_step(
    model, opt, torch_sam.softmax_xent, x, y, torch_sam.Spec(rho=0.5, m=4, objective="random")
  )
  # Two chunks, each moving the running mean once (momentum 0.1) at theta; the perturbed passes
  # leave it alone.
  assert int(bn.num_batches_tracked) == 2
  np.testing.assert_allclose(
    bn.running_mean.numpy(), (0.9 * 0.1 * mean1 + 0.1 * mean2).numpy(), rtol=1e-5, atol=1e-7
  )
