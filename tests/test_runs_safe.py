"""Runs are safe: preemption, non-finite steps, checkpoint fallback, one run per workdir, paths.

Most tests share one finished 6-step run (8 simulated devices, checkpoints at steps 2, 4, 6) and
work on copies of its workdir; the SIGTERM test runs main.py in single-process subprocesses.
"""

import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import default as default_config
from pf_jax import checkpointing
from pf_jax import config_validation
from pf_jax import experiment
from pf_jax import input_pipeline
from pf_jax import train
from pf_jax import workdir as workdir_lib
from tests import tiny_run
from tests.tiny_run import config as _config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _restore(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
    return mngr.restore(step, args=ocp.args.StandardRestore())


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """(workdir, data_dir, results) of a finished 6-step run with checkpoints at steps 2, 4 and 6."""
  base = tmp_path_factory.mktemp("finished")
  data_dir, workdir = base / "data", str(base / "run")
  results = train.train_and_evaluate(_config(data_dir), workdir)
  assert _steps(workdir) == [2, 4, 6]
  return workdir, data_dir, results


def _copy(finished, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(finished[0], dst)
  return dst


@pytest.fixture
def no_compile(monkeypatch):
  """Makes building the train step an error: for checks that must fail before compiling."""

  def fail(*args, **kwargs):
    raise AssertionError("the train step was built")

  monkeypatch.setattr(train, "make_train_step", fail)


# --- Preemption ---------------------------------------------------------------------------------


_env = tiny_run.main_env


def _cmd(workdir, data_dir, steps):
  return [
    sys.executable,
    "main.py",
    f"--workdir={workdir}",
    f"--config.data_dir={data_dir}",
    f"--config.num_train_steps={steps}",
    "--config.warmup_steps=5",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=100000",
    "--config.checkpoint_every_steps=100000",
    "--config.global_batch_size=32",
    "--config.eval_batch_size=64",
    "--config.sam.m=16",
  ]


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.long  # CI runs it (-m long); not in the default suite
def test_sigterm_saves_the_current_step_exits_75_and_the_restart_is_bit_identical(tmp_path):
  """SIGTERM in the training loop checkpoints the current step (exit 75); the restart, stopped
  once more during its start-up (exit 75 at once), then run again, ends bit-identical."""
  steps = 80
  data_dir = tmp_path / "data"
  input_pipeline.dataset_info("digits", data_dir=str(data_dir))  # prepared once, before the runs
  ref, run = tmp_path / "ref", tmp_path / "run"
  out = subprocess.run(
    _cmd(ref, data_dir, steps), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]

  seed = random.randrange(10**6)
  k = random.Random(seed).randint(2, 30)
  proc = subprocess.Popen(
    _cmd(run, data_dir, steps),
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines = []
  try:
    for line in proc.stderr:  # a "train step k/N: loss ..." line every step
      lines.append(line)
      if re.search(rf"train step {k}/", line):
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        break
    else:
      pytest.fail(f"step {k} never logged (seed {seed}):\n" + "".join(lines[-30:]))
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    exit_s = time.monotonic() - sent
  finally:
    proc.kill()
  log = "".join(lines) + rest
  assert proc.returncode == checkpointing.PREEMPTED_EXIT_CODE == 75, log[-3000:]
  stopped = int(re.search(r"Preempted at step (\d+): checkpoint saved", log).group(1))
  assert k <= stopped < steps, (k, stopped, seed)
  assert _steps(run) == [stopped]  # the only checkpoint (the interval is far beyond the run)
  assert int(_restore(run, stopped)["step"]) == stopped
  assert exit_s < 60, exit_s
  print(
    f"SIGTERM after step {k} (seed {seed}): checkpoint of step {stopped}, exit after {exit_s:.2f} s"
  )

  # The same command stopped again during its start-up (data checks, restore, compilation), by
  # SIGTERM or SIGINT: exit 75 at once with one line, its checkpoint untouched.
  delay = random.Random(seed).uniform(0.5, 4.0)
  sig = random.Random(seed + 1).choice([signal.SIGTERM, signal.SIGINT])
  proc = subprocess.Popen(
    _cmd(run, data_dir, steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  try:
    time.sleep(delay)
    proc.send_signal(sig)
    log = proc.communicate(timeout=120)[1]
  finally:
    proc.kill()
  assert proc.returncode == 75, (sig.name, delay, seed, log[-3000:])
  if "train step" in log:  # it had reached the training loop: a newer checkpoint
    stopped = int(re.search(r"Preempted at step (\d+): checkpoint saved", log).group(1))
  else:
    assert log.splitlines()[-1].startswith(f"preempted ({sig.name}) outside the training loop")
    assert log.count("preempted (") == 1 and _steps(run) == [stopped], log
  assert not os.path.exists(run / "lock.json")
  print(f"then {sig.name} {delay:.2f} s into the restart: exit 75")

  again = subprocess.run(
    _cmd(run, data_dir, steps), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed: step {stopped} from " in again.stderr
  a, b = _restore(ref, steps), _restore(run, steps)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])
  assert out.stdout == again.stdout  # the same final evaluation line


def _run_until(cmd, pattern, seed):
  """Starts `cmd`, reads its log until a line matches `pattern`; returns (process, lines)."""
  proc = subprocess.Popen(
    cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if re.search(pattern, line):
      return proc, lines
  proc.kill()
  pytest.fail(f"{pattern!r} never logged (seed {seed}):\n" + "".join(lines[-30:]))


@pytest.mark.slow
def test_sigkill_during_a_save_and_a_second_sigterm_then_the_restart_is_bit_identical(tmp_path):
  """SIGKILL right after a save started (orbax writes in the background: the step folder is
  often still a temporary one), and SIGTERM twice (the second stops at once, like SIGTERM without
  the catcher): each time the same command ends bit-identical to an uninterrupted run."""
  steps = 24
  data_dir = tmp_path / "data"
  input_pipeline.dataset_info("digits", data_dir=str(data_dir))

  def cmd(workdir):
    return [
      "--config.checkpoint_every_steps=1" if a.startswith("--config.checkpoint_every_steps") else a
      for a in _cmd(workdir, data_dir, steps)
    ]

  ref = tmp_path / "ref"
  out = subprocess.run(cmd(ref), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  seed = random.randrange(10**6)
  k = random.Random(seed).randint(3, steps - 4)

  killed = tmp_path / "killed"
  proc, _ = _run_until(cmd(killed), rf"checkpoint step {k}:", seed)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL

  twice = tmp_path / "twice"
  proc, lines = _run_until(cmd(twice), rf"train step {k}/", seed)
  proc.send_signal(signal.SIGTERM)
  for line in proc.stderr:
    lines.append(line)
    if "Received SIGTERM" in line:
      proc.send_signal(signal.SIGTERM)
      break
  proc.wait(timeout=60)
  assert proc.returncode in (-signal.SIGTERM, checkpointing.PREEMPTED_EXIT_CODE), "".join(lines)

  for run in (killed, twice):
    again = subprocess.run(
      cmd(run), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed: step " in again.stderr
    a, b = _restore(ref, steps), _restore(run, steps)
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])
    assert out.stdout == again.stdout
  print(f"seed {seed}: SIGKILL at the save of step {k}; second SIGTERM exit {proc.returncode}")


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.long  # CI runs it (-m long); not in the default suite
def test_two_concurrent_starts_with_different_seeds_one_trains_the_other_stops(tmp_path):
  data_dir = tmp_path / "data"
  input_pipeline.dataset_info("digits", data_dir=str(data_dir))
  run = tmp_path / "run"
  procs = [
    subprocess.Popen(
      _cmd(run, data_dir, 30) + [f"--config.seed={seed}"],
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for seed in (0, 1)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  codes = [p.returncode for p in procs]
  assert sorted(codes) == [0, 1], [(c, o[1][-2000:]) for c, o in zip(codes, outs)]
  winner, loser = codes.index(0), codes.index(1)
  *progress, line = outs[loser][1].strip().splitlines()  # the one progress line, then the error
  assert [p.split(" ", 1)[1] for p in progress] == ["importing TensorFlow and the training system"]
  assert line.startswith(f"error: --workdir: {run} is in use by pid {procs[winner].pid} on host ")
  # The workdir is the winner's: its config, its checkpoints' config, its result.
  assert workdir_lib.load_config(run).seed == winner
  assert workdir_lib.checkpoint_config(run / "checkpoints").seed == winner
  assert _steps(run) == [30]
  assert workdir_lib.load_results(run)["step"] == 30
  assert not os.path.exists(run / "lock.json")
  assert len([f for f in os.listdir(run) if f.startswith("events.out")]) == 1


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  run = tmp_path / "run"
  first = workdir_lib.WorkdirLock(run).acquire()
  with pytest.raises(workdir_lib.WorkdirLockedError, match=f"in use by pid {os.getpid()} on host"):
    workdir_lib.WorkdirLock(run).acquire()
  os.close(first._fd)  # what the kernel does when the holder dies: the file stays, unlocked
  first._fd = None
  with workdir_lib.WorkdirLock(run):
    assert json.loads((run / "lock.json").read_text())["pid"] == os.getpid()
  assert any("Taking over the lock of pid" in r.getMessage() for r in caplog.records)
  assert not (run / "lock.json").exists()


def _can_mount():
  try:
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
  except OSError:
    return False


_STORAGE_SCRIPT = """
set -u
M=$1; SRC=$2; OUT=$3; shift 3
mkdir -p $M && mount -t tmpfs -o size=4m tmpfs $M || exit 99
cp -a $SRC $M/run && rm -rf $M/run/checkpoints/6 $M/run/results.json
# Fill the filesystem but for ~256 KiB: the lock, config.json and events fit, a checkpoint does not.
dd if=/dev/zero of=$M/filler bs=4k count=$(( $(df -k --output=avail $M | tail -1) / 4 - 64 )) \
  2>/dev/null
"$@" > $OUT/full.out 2> $OUT/full.err; echo $? > $OUT/full.rc
ls $M/run/checkpoints > $OUT/full.ls
rm $M/filler
mount --bind $M/run/checkpoints $M/run/checkpoints && mount -o remount,ro,bind $M/run/checkpoints
"$@" > $OUT/ro.out 2> $OUT/ro.err; echo $? > $OUT/ro.rc
umount $M/run/checkpoints
"$@" > $OUT/again.out 2> $OUT/again.err; echo $? > $OUT/again.rc
cp -a $M/run $OUT/run
"""


@pytest.mark.slow  # three main.py runs
@pytest.mark.skipif(not _can_mount(), reason="needs `unshare -rm` (user and mount namespaces)")
def test_a_full_disk_and_a_read_only_checkpoint_directory_are_one_line_and_lose_nothing(
  finished, tmp_path
):
  """A real full filesystem (a 4 MiB tmpfs): the save of step 6 fails; then `checkpoints/` is
  mounted read-only; then the storage is fixed and the same command finishes the run."""
  mnt, out = tmp_path / "mnt", tmp_path / "out"
  out.mkdir()
  cmd = [sys.executable, "main.py", f"--workdir={mnt / 'run'}", f"--config.data_dir={finished[1]}"]
  cmd += tiny_run.flags()
  script = ["unshare", "-rm", "bash", "-c", _STORAGE_SCRIPT, "-", str(mnt), finished[0], str(out)]
  subprocess.run(script + cmd, cwd=ROOT, env=_env(), timeout=900, check=True)
  read = lambda name: (out / name).read_text()
  # Disk full: one line naming the path and the step, no "checkpoint step 6", step 4 intact.
  assert read("full.rc").strip() == "1", read("full.err")[-3000:]
  err = read("full.err").strip().splitlines()
  assert "Traceback" not in read("full.err") and not err[-1].startswith(" ")
  ckpts = mnt / "run" / "checkpoints"
  assert err[-1] == (
    f"error: checkpoint of step 6 in {ckpts} failed (No space left on device); newest good "
    "checkpoint: step 4; fix the storage and restart the same command to continue from it"
  )
  assert not any(re.search(r"checkpoint step 6\b", l) for l in err)
  assert read("full.ls").split() == ["2", "4", "6.orbax-checkpoint-tmp"]
  # Read-only checkpoints/: one line before anything compiles.
  assert read("ro.rc").strip() == "1"
  (line,) = read("ro.err").strip().splitlines()[-1:]
  assert line.startswith(f"error: {ckpts} is not writable (Read-only file system)"), read("ro.err")
  assert "train step" not in read("ro.err") and "Traceback" not in read("ro.err")
  # Fixed: the leftover is removed, the run resumes from step 4 and finishes.
  assert read("again.rc").strip() == "0", read("again.err")[-3000:]
  assert "6.orbax-checkpoint-tmp: a checkpoint save that did not complete" in read("again.err")
  assert "resumed: step 4 from " in read("again.err")
  assert _steps(out / "run") == [2, 4, 6]
  assert sorted(os.listdir(out / "run" / "checkpoints")) == ["2", "4", "6"]
  jax.tree.map(
    np.testing.assert_array_equal,
    _restore(finished[0], 4)["params"],
    _restore(out / "run", 4)["params"],
  )


def test_a_workdir_or_checkpoint_directory_removed_during_a_run_is_noticed_before_a_save(tmp_path):
  """orbax would recreate a removed directory at the next save (and the run go on, its earlier
  checkpoints, config.json and events gone): `check_intact` stops it, naming what is gone."""
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"

  def gone(path):
    with pytest.raises(checkpointing.StorageError) as err:
      checkpointing.check_intact(mngr, workdir, 2)
    assert str(err.value) == (
      f"{path} was removed while the run was going: step 2 is not saved; restore it and "
      "restart the same command to resume, or restart the same command to train again from "
      "step 0"
    )

  workdir_lib.save_config(workdir, _config(tmp_path / "data"))
  mine = workdir_lib.WorkdirLock(workdir).acquire()
  with ocp.CheckpointManager(ckpts, options=ocp.CheckpointManagerOptions(create=True)) as mngr:
    checkpointing.check_intact(mngr, workdir, 1)  # nothing saved yet: the workdir and config.json
    checkpointing.save(mngr, 1, {"w": jnp.ones(3)})
    checkpointing.finish(mngr, 1)
    checkpointing.check_intact(mngr, workdir, 2)
    # The lock file removed, then another start locking a new one: this run is no longer the
    # workdir's and stops, leaving the other's lock in place.
    os.remove(workdir / "lock.json")
    stops = "; this run stops without saving step 2 and leaves the workdir to it"
    with pytest.raises(checkpointing.StorageError) as err:
      checkpointing.check_intact(mngr, workdir, 2)
    assert str(err.value) == (
      f"--workdir: {workdir} is no longer this run's: its lock {workdir / 'lock.json'} was "
      f"removed{stops}"
    )
    other = {"host": "h2", "pid": 7, "started": "T", "token": "other"}  # another process's
    fd = os.open(workdir / "lock.json", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(other).encode())
    with pytest.raises(checkpointing.StorageError) as err:
      checkpointing.check_intact(mngr, workdir, 2)
    assert str(err.value) == (
      f"--workdir: {workdir} is no longer this run's: its lock was taken over by pid 7 on host "
      f"h2, started T (lock {workdir / 'lock.json'}){stops}"
    )
    mine.release()
    assert json.loads((workdir / "lock.json").read_text()) == other
    os.close(fd)
    checkpointing.check_intact(mngr, workdir, 2)  # no lock held (library use): nothing to lose
    shutil.rmtree(ckpts / "1")  # its newest checkpoint
    gone(ckpts / "1")
    shutil.rmtree(ckpts)
    gone(ckpts)
    os.remove(workdir / "config.json")
    gone(workdir / "config.json")
    shutil.rmtree(workdir)  # the whole workdir, or one replaced by a new empty directory
    gone(workdir)
    workdir.mkdir()
    gone(workdir / "config.json")


@pytest.mark.slow  # two resumed runs; check_intact itself is tested above
@pytest.mark.parametrize("remove", ["checkpoints", "workdir"])
def test_a_run_whose_directory_is_removed_stops_at_the_next_save(
  finished, tmp_path, monkeypatch, remove
):
  """Resumed at step 4, the directory is removed while steps 5-6 train: the save of step 6
  stops the run (StorageError, one line); nothing is written back, no results."""
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  os.remove(os.path.join(workdir, "results.json"))
  target = workdir if remove == "workdir" else os.path.join(workdir, "checkpoints")
  original = input_pipeline.train_iterator

  def removing_iterator(*args, start_step=0, **kwargs):
    for step, batch in enumerate(original(*args, start_step=start_step, **kwargs), start_step + 1):
      if step == 6:
        shutil.rmtree(target)
      yield batch

  monkeypatch.setattr(input_pipeline, "train_iterator", removing_iterator)
  with pytest.raises(checkpointing.StorageError) as err:
    train.train_and_evaluate(_config(finished[1]), workdir)
  assert str(err.value).startswith(f"{target} was removed while the run was going: step 6 ")
  assert not os.path.exists(target)


# --- Non-finite steps ---------------------------------------------------------------------------


def test_a_non_finite_step_is_skipped_inside_the_step_with_batch_norm():
  """A NaN batch: parameters, optimizer state and BatchNorm statistics stay, the step counts."""
  c = default_config.get_config()
  c.model, c.global_batch_size, c.sam.perturbation = "resnet_tiny", 16, "none"
  c.optimizer, c.lr_max = "sgdw", 0.5
  c.num_train_steps, c.warmup_steps = 10, 0
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("data",))
  exp = experiment.build(c, num_classes=10, num_train_examples=1438, num_devices=2)
  state = jax.device_put(exp.init_state(), NamedSharding(mesh, P()))
  step = train.make_train_step(exp, mesh)
  rng = np.random.default_rng(0)
  batch = lambda: {
    "image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
    "label": rng.integers(0, 10, size=16).astype(np.int32),
  }
  put = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
  state, m = step(state, put(batch()))
  assert float(m["nonfinite"]) == 0
  before = jax.device_get(state)
  bad = batch()
  bad["image"][3, 2, 2, 0] = np.nan  # one pixel of one example
  state, m = step(state, put(bad))
  after = jax.device_get(state)
  assert float(m["nonfinite"]) == 1
  assert int(after.step) == int(before.step) + 1
  for part in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(before, part), getattr(after, part))
  state, m = step(state, put(batch()))  # and training goes on
  assert float(m["nonfinite"]) == 0
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(after.params))
  )


def _nan_iterator(monkeypatch, bad_steps):
  """Training batches whose images are NaN at the given (1-based) steps."""
  original = input_pipeline.train_iterator

  def nan_iterator(*args, start_step=0, **kwargs):
    for step, batch in enumerate(original(*args, start_step=start_step, **kwargs), start_step + 1):
      if step in bad_steps:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, "train_iterator", nan_iterator)


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
def test_an_injected_non_finite_step_is_skipped_counted_and_never_saved(tmp_path, monkeypatch):
  _nan_iterator(monkeypatch, {2})
  summaries = {}
  summarize = train._summarize
  monkeypatch.setattr(
    train, "_summarize", lambda f: summaries.setdefault(len(summaries), summarize(f))
  )
  # Saves between logs; 6 steps as in `finished` (the same compiled train step).
  c = _config(tmp_path / "data", checkpoint_every_steps=1, log_every_steps=3)
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(c, workdir)
  assert 0 <= results["eval/digits/top1"] <= 1
  assert _steps(workdir) == [1, 2, 3, 4, 5, 6]
  ckpts = {s: _restore(workdir, s) for s in _steps(workdir)}
  for s, ck in ckpts.items():
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(ck)), s
  # Step 2 was skipped: its state is step 1's but for the step counter; step 3 trained again.
  for part in ("params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, ckpts[1][part], ckpts[2][part])
  assert int(ckpts[2]["step"]) == 2
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ckpts[2]["params"]), jax.tree.leaves(ckpts[3]["params"]))
  )
  assert summaries[0]["train/nonfinite_steps"] == 1 and np.isfinite(summaries[0]["train/loss"])
  assert summaries[1]["train/nonfinite_steps"] == 0


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
def test_a_persistently_non_finite_run_stops_naming_the_step_and_the_last_good_checkpoint(
  tmp_path, monkeypatch
):
  _nan_iterator(monkeypatch, set(range(4, 100)))
  c = _config(tmp_path / "data", log_every_steps=5, max_consecutive_nonfinite=3)  # 6 steps
  workdir = tmp_path / "run"
  with pytest.raises(checkpointing.NonFiniteError) as err:
    train.train_and_evaluate(c, str(workdir))
  message = str(err.value)
  assert "\n" not in message
  assert "3 consecutive steps" in message and "the last at step 6" in message
  assert f"last good checkpoint: step 4 in {workdir / 'checkpoints'}" in message
  assert _steps(workdir) == [2, 4]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(_restore(workdir, 4)))


def test_a_non_finite_state_is_never_saved(tmp_path):
  with ocp.CheckpointManager(
    tmp_path / "ck", options=ocp.CheckpointManagerOptions(create=True)
  ) as mngr:
    checkpointing.save(mngr, 1, {"w": jnp.ones(3)})
    with pytest.raises(
      checkpointing.NonFiniteError, match="step 2 .* last good checkpoint: step 1"
    ):
      checkpointing.save(mngr, 2, {"w": jnp.array([1.0, jnp.inf, 0.0])})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1]


# --- Checkpoint fallback ------------------------------------------------------------------------


def _truncate_largest_data_file(step_dir):
  files = [
    os.path.join(d, f)
    for d, _, fs in os.walk(step_dir)
    for f in fs
    if os.sep + "d" + os.sep in os.path.join(d, f)
  ]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove_manifests(step_dir):
  found = [
    os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs if f == "manifest.ocdbt"
  ]
  assert found
  for path in found:
    os.remove(path)


def test_damaged_latest_checkpoints_are_moved_aside_and_the_newest_good_one_resumed(
  finished, tmp_path, caplog
):
  workdir = _copy(finished, tmp_path)
  _truncate_largest_data_file(os.path.join(workdir, "checkpoints", "6"))
  _remove_manifests(os.path.join(workdir, "checkpoints", "4"))
  results = train.train_and_evaluate(_config(finished[1]), workdir)
  for step in (4, 6):  # kept, not deleted
    assert os.path.isdir(os.path.join(workdir, "checkpoints.broken", str(step), "default"))
  warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert len(warnings) == 2 and not any("\n" in w for w in warnings)
  assert "step 6" in warnings[0] and "step 4" in warnings[1]
  assert all("resuming from step 2" in w for w in warnings)
  # Steps 3-6 were trained again from step 2: the same result as the undamaged run, bit for bit.
  assert _steps(workdir) == [2, 4, 6]
  assert results == finished[2]
  jax.tree.map(
    np.testing.assert_array_equal,
    _restore(finished[0], 6)["params"],
    _restore(workdir, 6)["params"],
  )


def test_the_analysis_reads_the_newest_checkpoint_that_restores_and_says_so(
  finished, tmp_path, caplog
):
  workdir = _copy(finished, tmp_path)
  _truncate_largest_data_file(os.path.join(workdir, "checkpoints", "6"))
  params, _, step = checkpointing.load_variables(workdir)  # what `sharpness` and `init_from` read
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, _restore(finished[0], 4)["params"], params)
  (warning,) = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  assert warning.startswith("Checkpoint of step 6 in ") and warning.endswith(": using step 4")
  assert _steps(workdir) == [2, 4, 6]  # an analysis moves nothing


def test_an_empty_stray_step_folder_and_a_stray_file_are_ignored_with_a_warning(
  finished, tmp_path, caplog
):
  workdir = _copy(finished, tmp_path)
  os.makedirs(os.path.join(workdir, "checkpoints", "999"))
  with open(os.path.join(workdir, "checkpoints", "notes.txt"), "w") as f:
    f.write("mine")
  results = train.train_and_evaluate(_config(finished[1]), workdir)  # finished: evaluates step 6
  assert results == finished[2]
  assert _steps(workdir) == [2, 4, 6]
  assert os.path.isdir(os.path.join(workdir, "checkpoints.broken", "999"))
  messages = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert "empty checkpoint folder" in messages and "notes.txt" in messages


def test_no_restorable_checkpoint_stops_without_moving_anything(finished, tmp_path, no_compile):
  workdir = _copy(finished, tmp_path)
  for step in (2, 4, 6):
    _remove_manifests(os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(checkpointing.CheckpointError, match="the latest, step 6, fails with"):
    train.train_and_evaluate(_config(finished[1]), workdir)
  assert _steps(workdir) == [2, 4, 6] and not os.path.exists(
    os.path.join(workdir, "checkpoints.broken")
  )


# --- One run per workdir ------------------------------------------------------------------------


def test_a_changed_sam_m_is_refused_before_compiling_naming_the_field(
  finished, tmp_path, no_compile
):
  workdir = _copy(finished, tmp_path)
  with pytest.raises(workdir_lib.ConfigMismatchError) as err:
    train.train_and_evaluate(_config(finished[1], **{"sam.m": 8, "seed": 3}), workdir)
  lines = str(err.value).splitlines()
  assert lines[0] == "config.sam.m: 16 in this workdir, 8 now"
  assert lines[1] == "config.seed: 0 in this workdir, 3 now"
  assert len(lines) == 3 and "--allow_config_change" in lines[2]
  assert json.loads(open(os.path.join(workdir, "config.json")).read())["sam"]["m"] == 16


def test_safe_changes_are_accepted_and_the_override_keeps_the_old_config(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  before = set(os.listdir(workdir))
  c = _config(finished[1], log_every_steps=1, checkpoint_every_steps=5, eval_every_steps=2)
  assert train.train_and_evaluate(c, workdir) == finished[2]
  assert workdir_lib.load_config(workdir).log_every_steps == 1
  # The finished run's re-evaluation went to the events (not an empty extra events file).
  (new,) = [f for f in set(os.listdir(workdir)) - before if f.startswith("events.out.tfevents")]
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tags = {
    (e.step, v.tag)
    for e in tf.compat.v1.train.summary_iterator(os.path.join(workdir, new))
    for v in e.summary.value
  }
  assert (6, "eval/digits/top1") in tags
  c = _config(finished[1], **{"sam.m": 8})
  train.train_and_evaluate(c, workdir, allow_config_change=True)
  assert workdir_lib.load_config(workdir).sam.m == 8
  assert json.loads(open(os.path.join(workdir, "config.1.json")).read())["sam"]["m"] == 16


def test_a_deleted_config_json_is_replaced_by_the_config_the_checkpoints_carry(
  finished, tmp_path, no_compile
):
  workdir = _copy(finished, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(workdir_lib.ConfigMismatchError) as err:
    train.train_and_evaluate(_config(finished[1], seed=1, lr_max=0.5), workdir)
  lines = str(err.value).splitlines()
  assert lines[0].startswith("config.lr_max: ") and lines[0].endswith(" in this workdir, 0.5 now")
  assert lines[1] == "config.seed: 0 in this workdir, 1 now"
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_checkpoints_without_any_config_are_refused(finished, tmp_path, no_compile):
  workdir = _copy(finished, tmp_path)
  os.remove(os.path.join(workdir, "config.json"))
  for step in _steps(workdir):  # checkpoints as written before they carried the config
    meta = os.path.join(workdir, "checkpoints", str(step), "_CHECKPOINT_METADATA")
    d = json.loads(open(meta).read())
    del d["custom_metadata"]["config"]
    open(meta, "w").write(json.dumps(d))
  with pytest.raises(workdir_lib.ConfigMismatchError, match="neither config.json nor a config"):
    train.train_and_evaluate(_config(finished[1]), workdir)


@pytest.mark.parametrize("content", [b'{"seed": 0, "sam": {"m"', b"\xff\xfe garbage", b"[1, 2]"])
def test_a_damaged_config_json_is_one_line_naming_the_file(finished, tmp_path, no_compile, content):
  workdir = _copy(finished, tmp_path)
  path = os.path.join(workdir, "config.json")
  open(path, "wb").write(content)
  with pytest.raises(workdir_lib.DamagedFileError) as err:
    train.train_and_evaluate(_config(finished[1]), workdir)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"{path} is damaged (")
  assert "restore it, or delete it" in message


def test_a_workdir_without_checkpoints_takes_the_new_config(tmp_path):
  workdir = tmp_path / "run"
  workdir_lib.save_config(workdir, _config(tmp_path / "data"))
  workdir_lib.check_config(workdir, _config(tmp_path / "data", seed=5), has_run=False)  # no error


# --- Paths and devices --------------------------------------------------------------------------


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://... paths served from tmp_path/gcs through a fake epath backend (no network)."""
  monkeypatch.setattr(
    epath.gpath, "_is_tf_installed", lambda: False
  )  # else gs:// goes to tf.io.gfile
  root = tmp_path / "gcs"
  root.mkdir()
  local = lambda p: str(root / str(p)[len("gs://") :]) if str(p).startswith("gs://") else str(p)

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, src, dst, *args, **kwargs):
    return fn(local(src), local(dst), *args, **kwargs)

  names = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
  with epath_testing.mock_epath(**{n: one for n in names}, rename=two, replace=two, copy=two):
    yield root


def test_gs_paths_are_kept_intact(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(checkpointing.as_path("gs://bucket/run")) == "gs://bucket/run"
  assert str(checkpointing.find_checkpoints("gs://bucket/run")) == "gs://bucket/run"
  c = _config("gs://bucket/data")
  workdir_lib.save_config("gs://bucket/run", c)
  assert (fake_gcs / "bucket" / "run" / "config.json").exists()
  assert str(checkpointing.find_checkpoints("gs://bucket/run")) == "gs://bucket/run"
  (fake_gcs / "bucket" / "run" / "checkpoints" / "7").mkdir(parents=True)
  assert str(checkpointing.find_checkpoints("gs://bucket/run")) == "gs://bucket/run/checkpoints"
  with pytest.raises(
    workdir_lib.ConfigMismatchError, match="config.sam.m: 16 in this workdir, 4 now"
  ):
    workdir_lib.check_config(
      "gs://bucket/run", _config("gs://bucket/data", **{"sam.m": 4}), has_run=True
    )
  checkpointing.tidy("gs://bucket/run/checkpoints")  # an empty step folder is moved aside
  assert (fake_gcs / "bucket" / "run" / "checkpoints.broken" / "7").is_dir()
  assert not (tmp_path / "gs:").exists()
  config_validation.validate(
    _config("gs://bucket/data", init_from="gs://bucket/run"), num_devices=8, num_processes=1
  )


def test_the_object_store_lock_refuses_a_second_start_and_takes_over_an_abandoned_one(
  fake_gcs, monkeypatch, caplog
):
  """The write-wait-read lock of object stores without conditional writes through epath (gs://
  itself uses conditional writes: tests/test_gcs.py), on the fake backend."""
  monkeypatch.setattr(workdir_lib, "EXACT_LOCK_PREFIXES", ())
  monkeypatch.setattr(workdir_lib, "SETTLE_S", 0.0)
  lock_file = fake_gcs / "bucket" / "run" / "lock.json"
  with workdir_lib.WorkdirLock("gs://bucket/run") as held:
    assert not held.local and json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirLockedError, match="gs://bucket/run is in use by pid"):
      workdir_lib.WorkdirLock("gs://bucket/run").acquire()
    assert held.lost() is None and held._refresh()
    # Taken over (this holder stalled past STALE_AFTER_S): it says so and never writes it back.
    taker = {"host": "h3", "pid": 8, "started": "T3", "token": "taker", "heartbeat": time.time()}
    lock_file.write_text(json.dumps(taker))
    assert workdir_lib.held_lock("gs://bucket/run/") is held
    assert (
      held.lost()
      == "its lock was taken over by pid 8 on host h3, started T3 (lock gs://bucket/run/lock.json)"
    )
    assert not held._refresh() and json.loads(lock_file.read_text()) == taker
  assert json.loads(lock_file.read_text()) == taker  # released: the taker's lock is kept
  assert workdir_lib.held_lock("gs://bucket/run") is None
  lock_file.unlink()
  # A concurrent start that writes its lock while this one waits to read back: this one stops.
  other = {"host": "h2", "pid": 7, "started": "T", "token": "other"}
  sneak = lambda _: lock_file.write_text(json.dumps(dict(other, heartbeat=time.time())))
  with monkeypatch.context() as m:
    m.setattr(time, "sleep", sneak)
    with pytest.raises(workdir_lib.WorkdirLockedError, match="in use by pid 7 on host h2"):
      workdir_lib.WorkdirLock("gs://bucket/run").acquire()
  # That holder, not refreshed for longer than STALE_AFTER_S: abandoned, taken over.
  other["heartbeat"] = time.time() - workdir_lib.STALE_AFTER_S - 1
  lock_file.write_text(json.dumps(other))
  with workdir_lib.WorkdirLock("gs://bucket/run"):
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert any("pid 7 on host h2" in r.getMessage() for r in caplog.records)
  assert not lock_file.exists()


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.long  # CI runs it (-m long); not in the default suite
def test_init_from_and_resume_of_an_8_device_checkpoint_on_1_device(finished, tmp_path):
  """On 1 device: init_from the 8-device run takes every parameter but the head (fresh), and the
  8-device run resumed from its step-4 checkpoint trains steps 5-6 to the 8-device result (up to
  float round-off of another summation order)."""
  out, workdir = tmp_path / "out", _copy(finished, tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  script = (
    "import json, sys, jax, numpy as np; from pf_jax import checkpointing, experiment, train, workdir\n"
    "assert jax.device_count() == 1\n"
    "flat = lambda t: {'/'.join(map(str, k)): np.asarray(v) for k, v in "
    "jax.tree_util.tree_flatten_with_path(t)[0]}\n"
    "p, _, _ = checkpointing.load_variables(sys.argv[1])\n"
    "np.savez(sys.argv[2] + '/loaded.npz', **flat(p))\n"
    "c = workdir.load_config(sys.argv[1])\n"
    "exp = experiment.build(c, num_classes=10, num_train_examples=1438, num_devices=1)\n"
    "fresh = jax.device_get(exp.init_state())\n"
    "np.savez(sys.argv[2] + '/init_from.npz', **flat(train.load_pretrained(exp, fresh, sys.argv[1]).params))\n"
    "np.savez(sys.argv[2] + '/fresh.npz', **flat(fresh.params))\n"
    "print(json.dumps(train.train_and_evaluate(workdir.load_config(sys.argv[3]), sys.argv[3])))"
  )
  os.makedirs(out)
  run = subprocess.run(
    [sys.executable, "-c", script, finished[0], str(out), workdir],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Resuming a run saved on 8 devices on 1 devices" in run.stderr
  # Loading: the 8-device checkpoint's arrays, exactly.
  six = {
    "/".join(map(str, k)): v
    for k, v in jax.tree_util.tree_flatten_with_path(_restore(finished[0], 6)["params"])[0]
  }
  four = {
    "/".join(map(str, k)): v
    for k, v in jax.tree_util.tree_flatten_with_path(_restore(finished[0], 4)["params"])[0]
  }
  loaded, init, fresh = (np.load(out / f"{n}.npz") for n in ("loaded", "init_from", "fresh"))
  assert sorted(loaded.files) == sorted(six) == sorted(init.files)
  for k, v in six.items():
    np.testing.assert_array_equal(loaded[k], v)
    # init_from: pretrained everywhere but the head, which is freshly initialized.
    np.testing.assert_array_equal(init[k], fresh[k] if "head" in k else v, err_msg=k)
  # Resumed at step 4 on 1 device, trained to step 6: the 8-device step 6, not its step 4.
  got = _restore(workdir, 6)["params"]
  got = {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(got)[0]}
  vec = lambda d: np.concatenate([np.ravel(d[k]) for k in sorted(d)])
  moved = np.linalg.norm(vec(six) - vec(four))
  assert np.linalg.norm(vec(got) - vec(six)) < 1e-3 * moved
  resumed = json.loads(run.stdout.strip().splitlines()[-1])
  assert resumed.keys() == finished[2].keys()


def test_a_leftover_orbax_temporary_folder_is_ignored_and_the_run_ends_identical(
  finished, tmp_path
):
  """A save killed mid-write leaves `<step>.orbax-checkpoint-tmp-<n>`: the restart resumes from
  the last finished checkpoint and saves that step again, bit-identical."""
  workdir = _copy(finished, tmp_path)
  ckpt = os.path.join(workdir, "checkpoints")
  shutil.rmtree(os.path.join(ckpt, "6"))
  tmp = os.path.join(ckpt, "6.orbax-checkpoint-tmp-1764590000000000")
  shutil.copytree(os.path.join(ckpt, "4"), tmp)  # a half-written save: some files, no commit
  _truncate_largest_data_file(tmp)
  results = train.train_and_evaluate(_config(finished[1]), workdir)
  assert results == finished[2]
  assert _steps(workdir) == [2, 4, 6]
  jax.tree.map(
    np.testing.assert_array_equal,
    _restore(finished[0], 6)["params"],
    _restore(workdir, 6)["params"],
  )


def test_an_unprepared_eval_dataset_fails_before_compiling(tmp_path, no_compile):
  c = _config(tmp_path / "data")
  c.eval_datasets = ("digits", "cifar10")
  with pytest.raises(input_pipeline.DatasetNotPreparedError) as err:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  message = str(err.value)
  assert "'cifar10'" in message and str(tmp_path / "data" / "cifar10") in message
  assert "tfds build cifar10" in message
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize("value", [0, -1])
def test_max_consecutive_nonfinite_must_be_positive(value):
  c = _config("/tmp", max_consecutive_nonfinite=value)
  with pytest.raises(ValueError, match="config.max_consecutive_nonfinite"):
    config_validation.validate(c, num_devices=8, num_processes=1)
