"""Two JAX processes on localhost (jax.distributed + gloo CPU collectives) train in lockstep.

`main.py --coordinator_address=localhost:PORT --num_processes=2 --process_id=I` is launched
twice (each process with DEVICES_PER_PROCESS CPU devices, sharing one workdir, as a multi-host
orbax checkpoint needs), next to a single-process reference run with the same total device
count whose global batches are the two processes' local batches concatenated
(tests/multiprocess_worker.py). The final states must agree: that shows both processes fed their
own data shards into one global batch, and that the cross-process gradient all-reduce kept them
in step. Only process 0 may write TensorBoard events and print the final metrics.
"""

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pf_jax import input_pipeline
from pf_jax import workdir as workdir_lib
from pf_jax.analysis import collect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 1
STEPS = 4
TIMEOUT_S = 240  # whole launch; a healthy run takes well under a minute and a half on 2 cores


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  # Optimization level 0: the tiny model compiles much faster; every run here uses the same flags.
  env["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count={num_devices} "
    "--xla_backend_optimization_level=0"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = (
    "gloo"  # the default in jax >= 0.5; explicit for older ones
  )
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  return env


def _config_flags(data_dir: str) -> list:
  return [
    f"--config={os.path.join(REPO, 'configs', 'default.py')}",
    f"--config.data_dir={data_dir}",
    f"--config.num_train_steps={STEPS}",
    "--config.warmup_steps=1",  # within the run (warmup_epochs would be longer than it)
    "--config.log_every_steps=1000",
    "--config.eval_every_steps=1000",
    "--config.checkpoint_every_steps=1000",  # the last step is always evaluated and checkpointed
    "--config.eval_batch_size=64",
    "--config.global_batch_size=128",
    "--config.sam.m=32",  # per-device batch 128 / 2 = 64: two m-chunks per device
    "--config.analysis.collect_every_steps=4",  # outputs at theta and theta^p at the last step
  ]


def _tail(path: str, n: int = 40) -> str:
  with open(path, errors="replace") as f:
    lines = [l for l in f.read().splitlines() if l.strip()]
  return "\n".join(lines[-n:])


def _run_all(jobs: dict, tmp_path):
  """Starts every job {name: (argv, env)} at once, waits for all: ({name: stdout}, {name: pid}).

  Fails (killing the others) as soon as one exits non-zero or on timeout, with every log's tail.
  """
  procs, logs = {}, {}
  try:
    for name, (argv, env) in jobs.items():
      out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
      logs[name] = (out.name, err.name)
      with out, err:
        procs[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=err)
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while any(p.poll() is None for p in procs.values()):
      bad = [n for n, p in procs.items() if p.poll() not in (None, 0)]
      if bad or time.monotonic() > deadline:
        failed = (
          f"{bad[0]} exited with {procs[bad[0]].returncode}"
          if bad
          else f"timeout after {TIMEOUT_S}s"
        )
        break
      time.sleep(0.2)
    if failed is None:
      bad = [n for n, p in procs.items() if p.returncode != 0]
      failed = f"{bad[0]} exited with {procs[bad[0]].returncode}" if bad else None
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  if failed:
    report = [f"{failed}; return codes { ({n: p.returncode for n, p in procs.items()}) }"]
    for name, (out, err) in logs.items():
      report.append(
        f"----- {name} stdout -----\n{_tail(out, 10)}\n----- {name} stderr -----\n{_tail(err)}"
      )
    raise AssertionError("\n".join(report))
  stdouts = {}
  for name, (out, _) in logs.items():
    with open(out) as f:
      stdouts[name] = f.read()
  return stdouts, {name: p.pid for name, p in procs.items()}


def _restore_state(workdir: str):
  """(step, state dict of numpy arrays) of the latest checkpoint, on this process's first device."""
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
  assert step is not None, f"no checkpoint in {directory}"
  path = os.path.join(directory, str(step), "default")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    # The multi-process checkpoint names devices this process does not have: restore onto ours.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = checkpointer.restore(path, target)
  return step, jax.tree.map(np.asarray, state)


def _top1(stdout: str) -> float:
  found = re.findall(r"eval/digits/top1=([0-9.]+)", stdout)
  assert len(found) == 1, stdout
  return float(found[0])


@pytest.mark.long  # ~50 s of three subprocesses (two processes and a one-process reference)
def test_two_processes_train_in_lockstep(tmp_path):
  data_dir = str(tmp_path / "data")
  input_pipeline.get_builder("digits", data_dir)  # prepared once here, not raced by the processes
  shared, reference = str(tmp_path / "shared"), str(tmp_path / "reference")
  port = _free_port()
  config = _config_flags(data_dir)
  jobs = {
    f"process{i}": (
      [
        sys.executable,
        os.path.join(REPO, "main.py"),
        f"--workdir={shared}",
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={NUM_PROCESSES}",
        f"--process_id={i}",
        *config,
      ],
      _env(DEVICES_PER_PROCESS),
    )
    for i in range(NUM_PROCESSES)
  }
  jobs["reference"] = (
    [
      sys.executable,
      os.path.join(REPO, "tests", "multiprocess_worker.py"),
      f"--emulate_processes={NUM_PROCESSES}",
      f"--workdir={reference}",
      *config,
    ],
    _env(NUM_PROCESSES * DEVICES_PER_PROCESS),
  )
  outputs, pids = _run_all(jobs, tmp_path)

  # Only process 0 reports (stdout) and writes TensorBoard events into the shared workdir.
  assert "top1=" not in outputs["process1"], outputs["process1"]
  events = glob.glob(os.path.join(shared, "events.out.tfevents.*"))
  assert len(events) == 1, events
  assert os.path.basename(events[0]).split(".")[-3] == str(pids["process0"]), (
    events,
    pids,
  )  # ...<pid>.<n>.v2

  # One multi-host checkpoint of the last step, equal to the single-process run on the same batches.
  step, state = _restore_state(shared)
  ref_step, ref_state = _restore_state(reference)
  assert step == ref_step == STEPS
  assert int(state["step"]) == STEPS
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  for (path, got), want in zip(
    jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref_state)
  ):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ref_state["params"]))
  # Same weights, other eval batching: at most one of the 359 test digits may flip.
  assert abs(_top1(outputs["process0"]) - _top1(outputs["reference"])) < 0.003

  # Collected outputs: gathered from both processes into the split's order by process 0. Each
  # process reads its half of the 359 test digits in batches of 64 (one per device), so the
  # m-chunks of the first 160 examples are the reference's (batches of 128, 64 per device).
  got, want = (collect.load_points(w)[-1] for w in (shared, reference))
  assert int(got["step"]) == STEPS and int(got["num_examples"]) == 359
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_allclose(got["probs"], want["probs"], atol=1e-5)
  np.testing.assert_allclose(got["probs_p"][:160], want["probs_p"][:160], atol=1e-5)
  assert np.abs(got["probs_p"] - got["probs"]).max() > 1e-3


def _start_two(workdir: str, data_dir: str, tmp_path, name: str) -> list:
  """Both processes of a 2-process main.py run on `workdir` (stderr in tmp_path/<name><i>.err)."""
  port, procs = _free_port(), []
  for i in range(NUM_PROCESSES):
    argv = [
      sys.executable,
      os.path.join(REPO, "main.py"),
      f"--workdir={workdir}",
      f"--coordinator_address=localhost:{port}",
      f"--num_processes={NUM_PROCESSES}",
      f"--process_id={i}",
      *_config_flags(data_dir),
    ]
    with open(tmp_path / f"{name}{i}.err", "w") as err:
      procs.append(
        subprocess.Popen(
          argv, cwd=REPO, env=_env(DEVICES_PER_PROCESS), stdout=subprocess.DEVNULL, stderr=err
        )
      )
  return procs


def _wait_all(procs, tmp_path, name: str) -> list[str]:
  """Each process's stderr once all have exited (all killed, the test failed, after TIMEOUT_S)."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = [(tmp_path / f"{name}{i}.err").read_text() for i in range(len(procs))]
  assert all(p.returncode >= 0 for p in procs), [
    (p.returncode, l[-2000:]) for p, l in zip(procs, logs)
  ]
  return logs


@pytest.mark.slow  # four 2-process starts, two of which train
def test_two_processes_stop_together_on_a_locked_workdir_and_on_signals_during_start_up(tmp_path):
  """A workdir locked by another run: both processes stop (exit 1, one line each). SIGTERM to both
  while they import: both exit 75 at once, nothing written. SIGINT to process 0 and SIGTERM to
  process 1 once they are connected (data checks, compilation): JAX's preemption notice, so both
  checkpoint the same first step and exit 75; the same command then resumes and finishes."""
  data_dir = str(tmp_path / "data")
  input_pipeline.get_builder("digits", data_dir)
  run = tmp_path / "run"
  with workdir_lib.WorkdirLock(run):
    procs = _start_two(run, data_dir, tmp_path, "locked")
    logs = _wait_all(procs, tmp_path, "locked")
  assert [p.returncode for p in procs] == [1, 1], logs
  lines = [l.strip().splitlines()[-1] for l in logs]
  assert lines[0].startswith(f"error: --workdir: {run} is in use by pid {os.getpid()} on host ")
  assert lines[1] == f"error: --workdir: {run} is in use (process 0 could not take its lock)"
  assert sorted(os.listdir(run)) == []

  procs = _start_two(run, data_dir, tmp_path, "early")
  time.sleep(0.5)  # importing JAX: not connected yet
  for p in procs:
    p.send_signal(signal.SIGTERM)
  logs = _wait_all(procs, tmp_path, "early")
  assert [p.returncode for p in procs] == [75, 75], logs
  for log in logs:
    assert log.strip().splitlines() == [
      "preempted (SIGTERM) outside the training loop: nothing unsaved; restart the same command "
      "to continue (exit code 75)"
    ]
  assert sorted(os.listdir(run)) == []

  procs = _start_two(run, data_dir, tmp_path, "connected")
  log0 = tmp_path / "connected0.err"
  deadline = time.monotonic() + TIMEOUT_S
  while "start: " not in log0.read_text() and time.monotonic() < deadline:
    time.sleep(0.1)  # process 0 has checked the data and restored: compilation comes next
  procs[0].send_signal(signal.SIGINT)
  procs[1].send_signal(signal.SIGTERM)
  logs = _wait_all(procs, tmp_path, "connected")
  assert [p.returncode for p in procs] == [75, 75], logs
  steps = [int(re.search(r"Preempted at step (\d+): checkpoint saved", l).group(1)) for l in logs]
  assert steps[0] == steps[1] < STEPS, logs
  assert "outside the training loop" not in logs[0] + logs[1]
  assert "preemption sync point" not in logs[0] + logs[1]  # orbax's own words: not shown
  assert sorted(os.listdir(run / "checkpoints")) == [str(steps[0])]
  assert not (run / "lock.json").exists() and not (run / "results.json").exists()
  assert workdir_lib.checkpoint_config(run / "checkpoints").sam.m == 32

  procs = _start_two(run, data_dir, tmp_path, "again")
  logs = _wait_all(procs, tmp_path, "again")
  assert [p.returncode for p in procs] == [0, 0], logs
  assert f"resumed: step {steps[0]} from " in logs[0]
  assert workdir_lib.load_results(run)["step"] == STEPS
  assert _restore_state(str(run))[0] == STEPS
