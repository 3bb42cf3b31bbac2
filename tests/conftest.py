"""Simulate 8 CPU devices for every test (must happen before jax is imported), and share compiled
programs between tests through JAX's persistent compilation cache.

One cache for the whole run: the two pytest-xdist workers and the `main.py` subprocesses the tests
start (they inherit the environment) compile many of the same train and eval steps. A cached
program is the same executable, so results stay bit-identical. JAX writes an entry in place
without a lock; a process that reads an entry still being written fails to decompress it, warns,
and compiles the program itself.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile

import pytest

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "pf_jax_tests_jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_collection_modifyitems(items):
  """Heavy tests first (a stable sort): the two xdist workers then end on short tests, instead of
  one of them still running a minute-long test after the other has run out of work."""
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
  """A directory of this test session shared by its pytest-xdist workers."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path):
  """Holds an exclusive lock on `path` (the other worker waits until the first one is done)."""
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def digits_data(session_dir):
  """A data_dir with digits prepared, once per session: for tests to which data is incidental."""
  from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  data_dir = session_dir / "digits_data"
  with _locked(session_dir / "digits_data.lock"):
    input_pipeline.dataset_info("digits", data_dir=str(data_dir))
  return data_dir


@pytest.fixture(scope="session")
def finished_run(session_dir, digits_data):
  """(workdir, results) of `tests/runs.py:tiny_config` trained to the end, once per session by
  the first worker that asks. Read-only: a test that changes it works on a copy."""
  from pf_jax import train  # pylint: disable=g-import-not-at-top
  from pf_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from tests import runs  # pylint: disable=g-import-not-at-top

  workdir = session_dir / "finished_run"
  with _locked(session_dir / "finished_run.lock"):
    if not (workdir / workdir_lib.RESULTS_FILE).exists():
      shutil.rmtree(workdir, ignore_errors=True)
      train.train_and_evaluate(runs.tiny_config(digits_data), str(workdir))
  results = workdir_lib.load_results(workdir)
  return str(workdir), {k: v for k, v in results.items() if k != "step"}
