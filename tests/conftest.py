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
# One cache per pytest-xdist worker: JAX writes cache entries non-atomically (no eviction lock),
# so two workers compiling the same program at once could read each other's half-written entry.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(tempfile.gettempdir(), f"pf_jax_tests_jax_cache_{_worker}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_collection_modifyitems(items):
  """Heavy tests first (a stable sort): the two xdist workers then end on short tests, instead of
  one of them still running a minute-long test after the other has run out of work."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
