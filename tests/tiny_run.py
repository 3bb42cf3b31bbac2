"""The tiny training run the run-safety and resume tests share: one config of the train step,
so it compiles once per test run (the compilation cache, tests/conftest.py)."""

from configs import default as default_config


def config(data_dir, **overrides):
  """The default config for 6 steps of batch 64 (m = 16) with checkpoints every 2 steps;
  `overrides` are field names, `sam.<name>` for the SAM fields."""
  c = default_config.get_config()
  if data_dir is not None:  # None: the config's own data_dir
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
