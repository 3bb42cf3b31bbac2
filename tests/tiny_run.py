"""The tiny training run the run-safety and resume tests share: one config of the train step,
so it compiles once per test run (the compilation cache, tests/conftest.py)."""

import os
import re

from configs import default as default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_env() -> dict:
  """The environment of a main.py subprocess of these tests: one CPU device, optimization level 0
  (the tiny model compiles much faster; every such run uses the same flags), the repository on
  PYTHONPATH."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


# The run: the default config for 6 steps of batch 64 (m = 16) with checkpoints every 2 steps.
FIELDS = {
  "num_train_steps": 6,
  "warmup_steps": 2,
  "checkpoint_every_steps": 2,
  "eval_every_steps": 6,
  "log_every_steps": 2,
  "keep_checkpoints": 10,
  "global_batch_size": 64,
  "eval_batch_size": 64,
  "sam.m": 16,
}


def config(data_dir, **overrides):
  """The run's config; `overrides` are field names, `sam.<name>` for the SAM fields."""
  c = default_config.get_config()
  if data_dir is not None:  # None: the config's own data_dir
    c.data_dir = str(data_dir)
  for k, v in {**FIELDS, **overrides}.items():
    target, name = (c.sam, k[4:]) if k.startswith("sam.") else (c, k)
    target[name] = v
  return c


def flags(**overrides) -> list[str]:
  """The run's fields as main.py flags (`--config.FIELD=VALUE`)."""
  return [f"--config.{k}={v}" for k, v in {**FIELDS, **overrides}.items()]
