"""The README's "use it in your own Flax loop" code must run as pasted; its links stay inside
the repository; docs/sam-family.md names what the code has."""

import pathlib
import re

import numpy as np

import pf_jax
from pf_jax import perturbations
from pf_jax import sam_family

ROOT = pathlib.Path(__file__).parents[1]


def test_readme_example_runs(capsys):
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  block = re.search(r"<!-- readme-example:start -->\s*```python\n(.*?)```", text, re.S).group(1)
  scope = {}
  exec(compile(block, "README.md", "exec"), scope)
  state = scope["opt_state"]
  assert float(state.metrics["rho"]) == np.float32(0.6)
  assert int(state.count) == 20
  assert np.isfinite(float(state.metrics["loss"]))
  assert "loss at theta" in capsys.readouterr().out


def _paths(text):
  """Markdown link targets and `backticked` strings that look like files of the repository."""
  links = re.findall(r"\]\(([^)]+)\)", text)
  ticked = [t for t in re.findall(r"`([^`\s]+)`", text) if re.search(r"\.(py|md)$", t)]
  return links + ticked


def test_readme_links_stay_in_the_repository():
  for doc in ("README.md", "docs/sam-family.md", "launch/README.md"):
    base = (ROOT / doc).parent
    for target in _paths((ROOT / doc).read_text()):
      assert "://" not in target and not target.startswith("/"), (doc, target)
      path = (
        (base / target).resolve() if not (ROOT / target).exists() else (ROOT / target).resolve()
      )
      assert path.is_relative_to(ROOT), (doc, target)
      assert path.exists(), (doc, target)
  assert "docs/sam-family.md" in (ROOT / "README.md").read_text()


def test_sam_family_doc_matches_the_code():
  """The page names the library's modes and entry points as they are spelled in the code."""
  text = (ROOT / "docs" / "sam-family.md").read_text()
  for mode in sam_family.ASAM_MODES + sam_family.CHUNK_MODES + perturbations.OBJECTIVE_NAMES:
    assert f'"{mode}"' in text, mode
  for name in (
    "sam",
    "sam_gradient",
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
