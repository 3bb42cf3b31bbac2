"""The library alone: `import pf_jax` needs none of the `train` extra (CI also installs it without
extras in a fresh venv, .ci/run)."""

import pathlib
import subprocess
import sys

import tomllib

ROOT = pathlib.Path(__file__).parents[1]
TRAIN_ONLY = {
  "tensorflow": "tensorflow",
  "tensorflow-cpu": "tensorflow",
  "tensorflow-datasets": "tensorflow_datasets",
  "clu": "clu",
  "orbax-checkpoint": "orbax",
  "ml_collections": "ml_collections",
  "matplotlib": "matplotlib",
  "scikit-learn": "sklearn",
}


def test_import_pf_jax_loads_nothing_of_the_train_extra():
  extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
  modules = sorted({TRAIN_ONLY[name] for name in extra["train"] if name in TRAIN_ONLY})
  assert "tensorflow" in modules
  code = "import sys, pf_jax; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  assert not set(modules) & set(out), sorted(set(modules) & set(out))
