"""Simulate 8 CPU devices for every test (must happen before jax is imported), and share compiled
programs between tests through JAX's persistent compilation cache: many tests (and the `main.py`
subprocesses they start, which inherit the environment) compile the same train and eval steps.
A cached program is the same executable, so results stay bit-identical."""

import os
import tempfile

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One cache for everything a test run starts: both pytest-xdist workers (they inherit this from
# the controller), their main.py subprocesses, and a `-m long` run after the default suite. JAX
# writes an entry without a lock; a half-written entry read by another process fails to
# deserialize, and JAX then compiles the program itself (with a warning): a race costs time only.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "pf_jax_tests_jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Test modules import TensorFlow before pf_jax (import order), and a later triton (torch's CUDA
# wheels: the `bench` extra) would segfault: pf_jax/before_tensorflow.py, which this imports.
import pf_jax.before_tensorflow  # noqa: E402, F401


def pytest_collection_modifyitems(items):
  """Heavy tests first (a stable sort): the two xdist workers then end on short tests, instead of
  one of them still running a minute-long test after the other has run out of work."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
