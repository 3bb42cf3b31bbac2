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
  code = "import sys, pf_jax; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.split()
  assert not set(modules) & set(out), sorted(set(modules) & set(out))


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
