"""No recompilation in the training loop: after the first train step, the first log, the first
checkpoint save and the first evaluation, nothing compiles again (an XLA compile costs seconds
to minutes on real models and stalls every device)."""

import jax
import pytest
from jax._src import compilation_cache
from jax._src import dispatch

from pf_jax import checkpointing
from pf_jax import train
from tests import tiny_run


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.long  # CI runs it (-m long); not in the default suite
def test_no_compilation_after_the_first_step_log_save_and_evaluation(tmp_path, monkeypatch):
  # Every program must really compile here (a persistent-cache hit records no compile event).
  monkeypatch.setattr(compilation_cache, "is_cache_used", lambda backend: False)
  phase = ["setup"]
  compiles = []

  def listener(event, duration, **kwargs):
    if event == dispatch.BACKEND_COMPILE_EVENT:
      compiles.append((phase[0], kwargs.get("fun_name", "")))

  make_train_step, evaluate, save = train.make_train_step, train.evaluate, checkpointing.save
  calls = {"train": 0, "eval": 0, "save": 0}

  def counted(kind, fn):
    def wrapper(*args, **kwargs):
      calls[kind] += 1
      phase[0] = f"{kind}{calls[kind]}"
      out = fn(*args, **kwargs)
      phase[0] = f"after_{kind}{calls[kind]}"  # logging, hooks: until the next call
      return out

    return wrapper

  monkeypatch.setattr(
    train, "make_train_step", lambda *a, **k: counted("train", make_train_step(*a, **k))
  )
  monkeypatch.setattr(train, "evaluate", counted("eval", evaluate))
  monkeypatch.setattr(checkpointing, "save", counted("save", save))

  # 6 steps; logs after steps 2, 4, 6, evaluates after steps 2, 4, 6, saves after steps 3, 6.
  c = tiny_run.config(
    tmp_path / "data",
    eval_every_steps=2,
    checkpoint_every_steps=3,
    global_batch_size=16,
    eval_batch_size=128,
    **{"sam.m": 2},
  )
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert calls == {"train": 6, "eval": 3, "save": 2}
  # Allowed: creating the state, the first train step, the first evaluation and the first save
  # (its finiteness check, and orbax's slicing of replicated arrays: once per leaf shape). The
  # log lines compile nothing: the learning rate comes with the step's metrics.
  first_time = {"setup", "train1", "eval1", "save1"}
  assert [p for p, _ in compiles if p == "eval1"], "the eval step compiles in the first evaluation"
  assert not [c for c in compiles if c[0] == "eval1" and c[1] != "jit(step)"], compiles
  later = [c for c in compiles if c[0] not in first_time]
  assert not later, f"compiled after the first step/log/save/evaluation: {later}"
