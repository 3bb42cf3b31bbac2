"""The tests' short training runs, declared once so that tests training the same thing share it.

- `tiny_config`: the 6-step run on 8 simulated devices (checkpoints at steps 2, 4, 6). The
  session fixture `finished_run` (tests/conftest.py) trains it once per test session for every
  test that only reads a finished run; tests that train a variant of it (a NaN batch, a resume)
  keep the fields that shape the compiled programs (model, batch sizes, m, steps, warmup), so
  they read those programs from the compilation cache instead of compiling them again.
- `main_cmd`/`main_env`: `python main.py` on 1 device for the tests that run the command line
  (preemption, two concurrent starts, the log lines); one set of program-shaping flags for all.
"""

import os
import re
import sys

from configs import default as default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
  """The default config trained for 6 steps (warmup 2) at global batch 64 with m = 16; logs every
  2 steps, checkpoints every 2, evaluates at the end. `overrides`: {"field" or "sam.field": v}."""
  c = default_config.get_config()
  c.data_dir = str(data_dir)
  c.num_train_steps = 6
  c.warmup_steps = 2
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 6
  c.log_every_steps = 2
  c.keep_checkpoints = 10
  c.global_batch_size = 64
  c.eval_batch_size = 64
  c.sam.m = 16
  for k, v in overrides.items():
    target, name = (c.sam, k[4:]) if k.startswith("sam.") else (c, k)
    target[name] = v
  return c


# `python main.py` runs: MAIN_STEPS steps on 1 device at XLA optimization level 0 (the tiny model
# compiles much faster); a train line every step, no checkpoint or evaluation before the end.
MAIN_STEPS = 40


def main_cmd(workdir, data_dir, **flags) -> list[str]:
  """`python main.py` with the shared flags; `flags` (e.g. seed=1, log_every_steps=10) add to or
  replace them, none of them shaping the compiled programs except those of a different test."""
  values = {
    "num_train_steps": MAIN_STEPS,
    "warmup_steps": 5,
    "log_every_steps": 1,
    "eval_every_steps": 100000,
    "checkpoint_every_steps": 100000,
    "global_batch_size": 32,
    "eval_batch_size": 64,
    "sam.m": 16,
    **flags,
  }
  return [sys.executable, "main.py", f"--workdir={workdir}", f"--config.data_dir={data_dir}"] + [
    f"--config.{k}={v}" for k, v in values.items()
  ]


def main_env() -> dict[str, str]:
  """The environment of `main_cmd` (and of the other short runs in subprocesses, e.g. the powered
  runner's): this one with 1 device and XLA optimization level 0."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env
