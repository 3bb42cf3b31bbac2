"""The library alone: `import pf_jax` needs none of the `train` extra (CI also installs it without
extras in a fresh venv, .ci/run)."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest
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
  code = (
    "import sys, pf_jax; public = [getattr(pf_jax, name) for name in pf_jax.__all__]; "
    "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
  )  # every public name: pf_jax imports each on first use
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  assert "jax" in out and "optax" in out  # the names were imported
  assert not set(modules) & set(out), sorted(set(modules) & set(out))


def test_the_process_module_imports_no_jax_and_the_public_names_resolve_on_first_use():
  """main.py catches SIGTERM/SIGINT before JAX's import (seconds) through pf_jax.process: importing
  it, and so pf_jax, must not import JAX. The public names then resolve to their modules' objects."""
  code = (
    "import sys, pf_jax.process; print('jax' in sys.modules); "
    "from pf_jax import *; from pf_jax import sam_family, train_state; "
    "print(sam is sam_family.sam and pf_jax.TrainState is train_state.TrainState, "
    "set(pf_jax.__all__) <= set(dir(pf_jax)), len(pf_jax.__all__))"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  assert out == ["False", "True", "True", "20"], out


@pytest.mark.long  # tens of seconds (TensorFlow, torch and timm imported in a fresh process)
def test_tensorflow_and_timm_in_one_process():
  """Issue 30: with the `bench` extra (torch's CUDA wheel and its triton), `import tensorflow;
  import timm` died with a segmentation fault in triton/knobs.py, and with it the test suite.
  pf_jax imports triton before TensorFlow (pf_jax/before_tensorflow.py); this runs the input
  pipeline's import, then timm, a torch optimizer (torch imports triton lazily) and a TF op in a
  fresh process, which must exit 0. Skips where tensorflow or timm is not installed (CI)."""
  for module in ("tensorflow", "timm"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} is not installed")
  code = (
    "from pf_jax import input_pipeline\n"
    "import timm, torch\n"
    "net = timm.create_model('resnet18', num_classes=3)\n"
    "torch.optim.SGD(net.parameters(), lr=0.1)\n"
    "out = net(torch.zeros(2, 3, 32, 32)).shape\n"
    "print(tuple(out), int(input_pipeline.tf.reduce_sum(input_pipeline.tf.ones(4))))\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
  assert run.stdout.split("\n")[-2] == "(2, 3) 4", run.stdout
