"""Tests for launch/tpu_pod.py and launch/local_gpu.py (run as subprocesses).

Nothing real is ever executed: gcloud / git / python are replaced by fake
executables in tmp_path that record their argv.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_pod.py")
GPU = os.path.join(REPO, "launch", "local_gpu.py")
LIBTPU_URL = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"

TPU_BASE = [
  "--name=pf-v3-32",
  "--zone=europe-west4-a",
  "--accelerator_type=v3-32",
  "--config=configs/cifar10_msweep.py:obf,64",
  "--workdir=gs://bucket/runs/a",
  "--override",
  "sam.rho_max=0.1",
]
GPU_BASE = [
  "--config=configs/cifar10_msweep.py:obf,64",
  "--workdir=/tmp/runs/a",
  "--override",
  "sam.rho_max=0.1",
]
WEIRD = 'it\'s a "quoted" value; $(touch pwned) & x'


def _fake(path, marker_dir, rc_expr="0"):
  """An executable that logs its argv (+ a few env vars) as a JSON line."""
  path.write_text(
    textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      with open({str(marker_dir / "calls.jsonl")!r}, 'a') as f:
        f.write(json.dumps({{'argv': [os.path.basename(sys.argv[0])] + sys.argv[1:],
                            'cwd': os.getcwd(),
                            'env': {{k: os.environ.get(k) for k in (
                                'CUDA_VISIBLE_DEVICES', 'TFDS_DATA_DIR',
                                'XLA_PYTHON_CLIENT_MEM_FRACTION')}}}}) + '\\n')
      sys.exit({rc_expr})
      """)
  )
  path.chmod(0o755)
  return path


@pytest.fixture
def fakebin(tmp_path):
  b = tmp_path / "bin"
  b.mkdir()
  # describe fails (TPU does not exist), everything else succeeds.
  _fake(b / "gcloud", tmp_path, "1 if 'describe' in sys.argv else 0")
  _fake(b / "git", tmp_path)
  _fake(b / "python", tmp_path)
  _fake(b / "pip", tmp_path)
  env = dict(os.environ, PATH=f"{b}{os.pathsep}{os.environ['PATH']}")
  return tmp_path, env


def calls(tmp_path):
  f = tmp_path / "calls.jsonl"
  if not f.exists():
    return []
  return [json.loads(l) for l in f.read_text().splitlines()]


def run(script, args, env=None, cwd=None, check_config=False):
  """The launcher's exit code and output. Its config check (`main.py --check_only`, seconds per
  call) runs only in the tests about it (check_config=True): the others check command lines."""
  return subprocess.run(
    [sys.executable, script, *args, *([] if check_config else ["--no_check"])],
    capture_output=True,
    text=True,
    env=env,
    cwd=cwd or REPO,
    timeout=60,
  )


def lines(stdout):
  return [l for l in stdout.splitlines() if l.strip()]


def remote_command(line):
  """The --command=... of a printed gcloud ssh line, split like the remote
  shell would."""
  argv = shlex.split(line)
  cmd = [a for a in argv if a.startswith("--command=")]
  assert len(cmd) == 1, line
  return cmd[0][len("--command=") :]


# --------------------------------------------------------------- tpu_pod.py


def test_tpu_help():
  r = run(TPU, ["--help"])
  assert r.returncode == 0, r.stderr
  assert "example:" in r.stdout
  assert "tpu_pod.py --name=" in r.stdout
  for flag in (
    "--accelerator_type",
    "--runtime_version",
    "--spot",
    "--preemptible",
    "--repo_dir",
    "--data_dir",
    "--override",
    "--dry_run",
  ):
    assert flag in r.stdout


def test_tpu_dry_run_commands(fakebin):
  tmp, env = fakebin
  r = run(
    TPU,
    TPU_BASE + ["--spot", "--project=my-proj", "--data_dir=gs://bucket/tfds", "--dry_run"],
    env=env,
  )
  assert r.returncode == 0, r.stderr
  out = lines(r.stdout)
  argvs = [shlex.split(l) for l in out]
  # Every printed line round-trips through shlex.
  for l, a in zip(out, argvs):
    assert shlex.join(a) == l
  gc = ["gcloud", "compute", "tpus", "tpu-vm"]
  describe = [a for a in argvs if a[:5] == gc + ["describe"]]
  create = [a for a in argvs if a[:5] == gc + ["create"]]
  scp = [a for a in argvs if a[:5] == gc + ["scp"]]
  ssh = [a for a in argvs if a[:5] == gc + ["ssh"]]
  assert len(describe) == 1 and len(create) == 1 and len(scp) == 1
  assert describe[0][5] == "pf-v3-32"
  c = create[0]
  assert c[5] == "pf-v3-32"
  for f in (
    "--zone=europe-west4-a",
    "--accelerator-type=v3-32",
    "--version=tpu-ubuntu2204-base",
    "--spot",
    "--project=my-proj",
  ):
    assert f in c
  assert "--preemptible" not in c
  assert "--worker=all" in scp[0]
  assert any(a[0] == "git" and "archive" in a for a in argvs)
  assert all(
    "--worker=all" in a and "--zone=europe-west4-a" in a and "--project=my-proj" in a for a in ssh
  )
  assert len(ssh) == 3  # unpack, install, run
  # Order: describe, create, copy, install, run.
  idx = {k: out.index(shlex.join(v[0])) for k, v in dict(d=describe, c=create, s=scp).items()}
  assert idx["d"] < idx["c"] < idx["s"]

  install = shlex.split(remote_command(shlex.join(ssh[1])))
  assert install[:2] == ["cd", "$HOME/pf_jax"]
  i = install.index("install")
  assert install[i - 2 : i + 6] == [
    "-m",
    "pip",
    "install",
    "-r",
    "requirements.txt",
    "jax[tpu]",
    "-f",
    LIBTPU_URL,
  ]
  assert install[-5:] == ["-m", "pip", "install", "-e", "."]

  remote = remote_command(shlex.join(ssh[2]))
  assert (
    "python3 main.py --config=configs/cifar10_msweep.py:obf,64 "
    "--workdir=gs://bucket/runs/a --config.sam.rho_max=0.1"
  ) in remote
  assert "TFDS_DATA_DIR=gs://bucket/tfds" in remote
  assert "nohup" in remote and "pf_jax.log" in remote
  # Dry run executes nothing: not gcloud, not git.
  assert calls(tmp) == []


def test_tpu_dry_run_quotes_values(fakebin):
  tmp, env = fakebin
  r = run(
    TPU,
    [
      "--name=pf",
      "--zone=us-central2-b",
      "--accelerator_type=v4-8",
      "--config=configs/cifar10_msweep.py:obf,64",
      f"--workdir=gs://b/{WEIRD}",
      f"--data_dir=gs://b/{WEIRD}",
      "--override",
      f"data_dir={WEIRD}",
      "--repo_dir=/opt/my code",
      "--dry_run",
    ],
    env=env,
  )
  assert r.returncode == 0, r.stderr
  run_line = lines(r.stdout)[-1]
  remote = shlex.split(remote_command(run_line))
  assert f"--workdir=gs://b/{WEIRD}" in remote
  assert f"--config.data_dir={WEIRD}" in remote
  assert f"TFDS_DATA_DIR=gs://b/{WEIRD}" in remote
  assert remote[:2] == ["cd", "/opt/my code"]
  # The assignment prefix must stay an assignment (KEY=..., not 'KEY=...').
  assert "TFDS_DATA_DIR='gs://b/" in remote_command(run_line)
  assert calls(tmp) == []


def test_tpu_remote_command_runs_safely_in_a_shell(tmp_path):
  """Execute the printed run command in bash with a fake python3: the quoted
  values arrive verbatim and nothing is injected."""
  b = tmp_path / "bin"
  b.mkdir()
  _fake(b / "python3", tmp_path)
  home = tmp_path / "home"
  (home / "pf_jax").mkdir(parents=True)
  r = run(
    TPU,
    [
      "--name=pf",
      "--zone=z",
      "--accelerator_type=v3-8",
      "--config=configs/cifar10_msweep.py:obf,64",
      f"--workdir={WEIRD}",
      f"--data_dir={WEIRD}",
      "--override",
      f"data_dir={WEIRD}",
      "--skip_copy",
      "--skip_install",
      "--foreground",
      "--dry_run",
    ],
  )
  assert r.returncode == 0, r.stderr
  remote = remote_command(lines(r.stdout)[-1])
  env = dict(os.environ, HOME=str(home), PATH=f"{b}{os.pathsep}{os.environ['PATH']}")
  subprocess.run(["bash", "-c", remote], check=True, env=env, cwd=tmp_path, timeout=30)
  (call,) = calls(tmp_path)
  assert call["argv"] == [
    "python3",
    "main.py",
    "--config=configs/cifar10_msweep.py:obf,64",
    f"--workdir={WEIRD}",
    f"--config.data_dir={WEIRD}",
  ]
  assert call["env"]["TFDS_DATA_DIR"] == WEIRD
  assert call["cwd"] == str(home / "pf_jax")
  assert not (tmp_path / "pwned").exists()
  assert not (home / "pf_jax" / "pwned").exists()


def test_tpu_foreground_uses_tty(fakebin):
  tmp, env = fakebin
  r = run(TPU, TPU_BASE + ["--foreground", "--dry_run"], env=env)
  assert r.returncode == 0, r.stderr
  last = shlex.split(lines(r.stdout)[-1])
  assert "--ssh-flag=-t" in last
  assert "nohup" not in remote_command(lines(r.stdout)[-1])


@pytest.mark.parametrize(
  "missing", ["--name", "--zone", "--accelerator_type", "--config", "--workdir"]
)
def test_tpu_missing_required_flag(fakebin, missing):
  tmp, env = fakebin
  args = [a for a in TPU_BASE if not a.startswith(missing + "=")]
  r = run(TPU, args + ["--dry_run"], env=env)
  assert r.returncode != 0
  assert missing in r.stderr
  assert calls(tmp) == []


def test_tpu_bad_values(fakebin):
  tmp, env = fakebin
  assert run(TPU, TPU_BASE + ["--override", "no_equals", "--dry_run"], env=env).returncode != 0
  r = run(TPU, TPU_BASE + ["--name=Bad Name", "--dry_run"], env=env)
  assert r.returncode != 0 and "--name" in r.stderr
  r = run(TPU, TPU_BASE + ["--spot", "--preemptible", "--dry_run"], env=env)
  assert r.returncode != 0
  assert calls(tmp) == []


def test_tpu_warns_on_local_workdir_for_pod(fakebin):
  tmp, env = fakebin
  r = run(TPU, TPU_BASE + ["--workdir=/tmp/local", "--dry_run"], env=env)
  assert r.returncode == 0
  assert "gs://" in r.stderr and "WARNING" in r.stderr
  r = run(TPU, TPU_BASE + ["--dry_run"], env=env)
  assert "--workdir" not in r.stderr


def test_tpu_override_prefixes(fakebin):
  tmp, env = fakebin
  r = run(
    TPU,
    TPU_BASE + ["--override=--config.sam.m=32", "--override", "config.seed=2", "--dry_run"],
    env=env,
  )
  assert r.returncode == 0, r.stderr
  remote = shlex.split(remote_command(lines(r.stdout)[-1]))
  assert "--config.sam.m=32" in remote and "--config.seed=2" in remote


def test_tpu_real_run_matches_dry_run(fakebin):
  """Without --dry_run, with fake gcloud/git: the same commands are run, in
  order (the TPU 'does not exist', so it is created)."""
  tmp, env = fakebin
  dry = run(TPU, TPU_BASE + ["--dry_run"], env=env)
  expected = [shlex.split(l) for l in lines(dry.stdout)]
  r = run(TPU, TPU_BASE, env=env)
  assert r.returncode == 0, r.stderr
  got = [c["argv"] for c in calls(tmp) if not (c["argv"][0] == "git" and "status" in c["argv"])]
  assert got == expected


def test_tpu_real_run_reuses_existing_and_stops_on_failure(tmp_path):
  b = tmp_path / "bin"
  b.mkdir()
  # describe succeeds (exists); the install ssh fails with 7.
  _fake(
    b / "gcloud",
    tmp_path,
    "7 if any('pip install' in a for a in sys.argv) else (print('READY v3-32') or 0)",
  )
  _fake(b / "git", tmp_path)
  env = dict(os.environ, PATH=f"{b}{os.pathsep}{os.environ['PATH']}")
  r = run(TPU, TPU_BASE, env=env)
  assert r.returncode == 7
  argvs = [c["argv"] for c in calls(tmp_path)]
  assert not any("create" in a for a in argvs)
  assert not any(any("main.py" in x for x in a) for a in argvs)


# ------------------------------------------------------------- local_gpu.py


def test_gpu_help():
  r = run(GPU, ["--help"])
  assert r.returncode == 0, r.stderr
  assert "example:" in r.stdout and "local_gpu.py --gpus=0,1" in r.stdout
  for flag in (
    "--gpus",
    "--install",
    "--xla_mem_fraction",
    "--data_dir",
    "--override",
    "--dry_run",
  ):
    assert flag in r.stdout


def test_gpu_dry_run(fakebin):
  tmp, env = fakebin
  py = str(tmp / "bin" / "python")
  r = run(
    GPU,
    GPU_BASE
    + [
      "--gpus=0,1",
      "--data_dir=/data/tf ds",
      "--xla_mem_fraction=.9",
      "--install",
      f"--python={py}",
      "--dry_run",
    ],
    env=env,
  )
  assert r.returncode == 0, r.stderr
  out = lines(r.stdout)
  for l in out:
    if not l.startswith("export "):
      assert shlex.join(shlex.split(l)) == l
    else:
      assert len(shlex.split(l)) == 2  # 'export KEY=value', value quoted
  assert out[0] == f"cd {shlex.quote(REPO)}"
  assert "export CUDA_VISIBLE_DEVICES=0,1" in out
  assert "export TFDS_DATA_DIR='/data/tf ds'" in out
  assert "export XLA_PYTHON_CLIENT_MEM_FRACTION=.9" in out
  assert shlex.join([py, "-m", "pip", "install", "-r", "requirements.txt", "jax[cuda12]"]) in out
  assert shlex.join([py, "-m", "pip", "install", "-e", "."]) in out
  assert out[-1] == shlex.join(
    [
      py,
      "main.py",
      "--config=configs/cifar10_msweep.py:obf,64",
      "--workdir=/tmp/runs/a",
      "--config.sam.rho_max=0.1",
    ]
  )
  assert calls(tmp) == []


def test_gpu_dry_run_is_pasteable(fakebin):
  """Pasting the printed lines into bash runs exactly the intended argv."""
  tmp, env = fakebin
  py = str(tmp / "bin" / "python")
  r = run(
    GPU,
    [
      "--config=configs/cifar10_msweep.py:obf,64",
      f"--workdir={WEIRD}",
      "--override",
      f"data_dir={WEIRD}",
      f"--data_dir={WEIRD}",
      "--gpus=1",
      f"--python={py}",
      "--dry_run",
    ],
    env=env,
  )
  assert r.returncode == 0, r.stderr
  assert calls(tmp) == []
  subprocess.run(["bash", "-c", r.stdout], check=True, env=env, timeout=30, cwd=tmp)
  (call,) = calls(tmp)
  assert call["argv"] == [
    "python",
    "main.py",
    "--config=configs/cifar10_msweep.py:obf,64",
    f"--workdir={WEIRD}",
    f"--config.data_dir={WEIRD}",
  ]
  assert call["env"]["TFDS_DATA_DIR"] == WEIRD
  assert call["env"]["CUDA_VISIBLE_DEVICES"] == "1"
  assert call["cwd"] == REPO
  assert not (tmp / "pwned").exists()
  assert not os.path.exists(os.path.join(REPO, "pwned"))


def test_gpu_real_run_propagates_exit_code(tmp_path):
  b = tmp_path / "bin"
  b.mkdir()
  py = _fake(b / "python", tmp_path, "3 if 'main.py' in sys.argv else 0")
  r = run(
    GPU,
    GPU_BASE
    + ["--gpus=0,1", "--data_dir=/d", "--xla_mem_fraction=0.5", "--install", f"--python={py}"],
  )
  assert r.returncode == 3, r.stderr
  cs = calls(tmp_path)
  assert [c["argv"][1:3] for c in cs] == [
    ["-m", "pip"],
    ["-m", "pip"],
    ["main.py", "--config=configs/cifar10_msweep.py:obf,64"],
  ]
  assert cs[-1]["env"] == {
    "CUDA_VISIBLE_DEVICES": "0,1",
    "TFDS_DATA_DIR": "/d",
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
  }
  assert cs[-1]["cwd"] == REPO


def test_gpu_install_failure_stops(tmp_path):
  b = tmp_path / "bin"
  b.mkdir()
  py = _fake(b / "python", tmp_path, "5 if 'pip' in sys.argv else 0")
  r = run(GPU, GPU_BASE + ["--install", f"--python={py}"])
  assert r.returncode == 5
  assert len(calls(tmp_path)) == 1


@pytest.mark.parametrize("missing", ["--config", "--workdir"])
def test_gpu_missing_required_flag(fakebin, missing):
  tmp, env = fakebin
  args = [a for a in GPU_BASE if not a.startswith(missing + "=")]
  r = run(GPU, args + ["--dry_run"], env=env)
  assert r.returncode != 0
  assert missing in r.stderr
  assert calls(tmp) == []


@pytest.mark.parametrize("bad", ["--gpus=0;rm", "--xla_mem_fraction=1.5", "--xla_mem_fraction=abc"])
def test_gpu_bad_values(fakebin, bad):
  tmp, env = fakebin
  r = run(GPU, GPU_BASE + [bad, "--dry_run"], env=env)
  assert r.returncode != 0
  assert bad.split("=")[0] in r.stderr


# ------------------------------------------------------- config check, examples


def _help_example(script):
  """The first command of the --help epilog, joined and split like a shell (no $HOME)."""
  out = run(script, ["--help"]).stdout
  text = out.split("example:", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
  argv = shlex.split(text.replace("$HOME", "/home/user"))
  assert argv[0] == "python3" and argv[1].startswith("launch/")
  return argv[2:]


@pytest.mark.parametrize("script", [TPU, GPU])
def test_help_example_works(fakebin, script):
  """The example in --help names a config and fields that exist, and its dry run succeeds."""
  tmp, env = fakebin
  args = _help_example(script)
  assert "--dry_run" in args
  r = run(script, args, env=env, check_config=True)
  assert r.returncode == 0, r.stderr
  config = [a for a in args if a.startswith("--config=")][0].split("=", 1)[1]
  assert os.path.exists(os.path.join(REPO, config.split(":")[0]))
  assert lines(r.stdout)[-1].count("main.py") == 1
  assert calls(tmp) == []


# Both launchers check through launch/common.check_config: each case runs on one of them.
@pytest.mark.parametrize(
  "script,base,bad,field",
  [
    (TPU, TPU_BASE, ["--override", "sam.rho=0.1"], "config.sam.rho"),  # unknown field
    (GPU, GPU_BASE, ["--override", "sam.obf_gamma=2"], "config.sam.obf_gamma"),
    (TPU, TPU_BASE, ["--config=configs/cifar10_resnet.py"], "--config"),  # no such file
    (GPU, GPU_BASE, ["--config=configs/vit_s32_imagenet.py:bogus"], "--config"),
  ],
)
def test_dry_run_checks_the_config_like_main(fakebin, script, base, bad, field):
  tmp, env = fakebin
  args = [a for a in base if not (bad[0].startswith("--config=") and a.startswith("--config="))]
  r = run(script, args + bad + ["--dry_run"], env=env, check_config=True)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith(f"error: {field}:"), r.stderr
  assert "main.py" not in r.stdout and calls(tmp) == []


def test_dry_run_checks_against_the_target_devices(fakebin):
  """512 examples: fine on v3-32 (32 devices), not on 3 GPUs; m=1024 would span 16 of v2-8's 8 devices."""
  tmp, env = fakebin
  assert run(TPU, TPU_BASE + ["--dry_run"], env=env, check_config=True).returncode == 0
  r = run(GPU, GPU_BASE + ["--gpus=0,1,2", "--dry_run"], env=env, check_config=True)
  assert r.returncode == 2 and "error: config.global_batch_size: 512" in r.stderr
  r = run(
    TPU,
    [a if a != "--accelerator_type=v3-32" else "--accelerator_type=v2-8" for a in TPU_BASE]
    + ["--override", "sam.m=1024", "--dry_run"],
    env=env,
    check_config=True,
  )
  assert r.returncode == 2 and "error: config.sam.m: 1024" in r.stderr
  r = run(GPU, GPU_BASE + ["--gpus=0,1,2", "--dry_run"], env=env)  # --no_check
  assert r.returncode == 0


def test_gpu_sigterm_reaches_main_and_its_preemption_code_comes_back(tmp_path):
  """SIGTERM to the launcher is passed on; it waits for the checkpoint and returns main.py's 75."""
  py = tmp_path / "python"
  py.write_text(
    textwrap.dedent(f"""\
      #!{sys.executable}
      import pathlib, signal, sys, time
      d = pathlib.Path({str(tmp_path)!r})
      def preempted(*_):
        time.sleep(1.0)  # saving a checkpoint
        (d / "saved").write_text("yes")
        sys.exit(75)
      signal.signal(signal.SIGTERM, preempted)
      (d / "ready").write_text("yes")
      time.sleep(60)
      """)
  )
  py.chmod(0o755)
  proc = subprocess.Popen(
    [sys.executable, GPU, *GPU_BASE, f"--python={py}"],
    cwd=REPO,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 30
  while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 75
  assert (tmp_path / "saved").read_text() == "yes"


def test_forgetting_pool_dry_run_lists_the_papers_pool(tmp_path):
  """launch/forgetting_pool.py --config=configs/cifar10_msweep.py: 3 perturbations x m = 2^0..2^9,
  each trained and its sharpness measured, then Figure 2 and the table over all 30 workdirs."""
  pool = os.path.join(REPO, "launch", "forgetting_pool.py")
  root = str(tmp_path / "pool")
  cmd = [sys.executable, pool, f"--root={root}", "--config=configs/cifar10_msweep.py", "--dry_run"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
  trains = [line for line in out.splitlines() if " main.py " in line]
  want = [f"{p},{2**k}" for p in ("steep", "obf", "obf_gamma0") for k in range(10)]
  assert [
    line.split("--config=configs/cifar10_msweep.py:")[1].split()[0] for line in trains
  ] == want
  assert out.count("pf_jax.analysis sharpness") == 30
  assert out.count(f"{root}/obf_gamma0-512-s0") == 4  # trained, sharpness, Figure 2, table
  assert all("--config.seed=0 " in line for line in trains)  # the config's SEEDS: one
  assert not os.path.exists(root)  # nothing ran


def test_forgetting_pool_seeds_are_a_seed_major_axis(tmp_path):
  """The digits pool: 5 seeds x 3 perturbations x m = 1..64 = 105 runs, every run of seed 0 first
  (a stopped pool holds whole m sweeps), the seed passed to main.py and in the workdir's name."""
  pool = os.path.join(REPO, "launch", "forgetting_pool.py")
  root = str(tmp_path / "pool")
  out = subprocess.run(
    [sys.executable, pool, f"--root={root}", "--dry_run"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  trains = [line for line in out.splitlines() if " main.py " in line]
  assert len(trains) == 5 * 3 * 7
  seeds = [int(line.split("--config.seed=")[1].split()[0]) for line in trains]
  assert seeds == sorted(seeds) and seeds[::21] == [0, 1, 2, 3, 4]
  assert trains[21].endswith(f"--workdir={root}/steep-1-s1")
  picked = subprocess.run(
    [sys.executable, pool, f"--root={root}", "--dry_run", "--seeds=3-4", "--m=2"],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  assert [line.split("--workdir=")[1] for line in picked.splitlines() if " main.py " in line] == [
    f"{root}/{p}-2-s{s}" for s in (3, 4) for p in ("steep", "obf", "obf_gamma0")
  ]


def test_a_launcher_runs_as_a_module_and_from_any_directory(fakebin):
  """launch/ is a package: `python -m launch.local_gpu` prints what `python launch/local_gpu.py`
  does, and so does the script run from another directory (it puts the repository on sys.path)."""
  tmp, env = fakebin
  args = GPU_BASE + ["--gpus=0", "--dry_run"]
  here = run(GPU, args, env=env)
  elsewhere = run(GPU, args, env=env, cwd=str(tmp))
  module = run("-m", ["launch.local_gpu", *args], env=env)
  assert here.returncode == elsewhere.returncode == module.returncode == 0, module.stderr
  assert lines(here.stdout)[0] == f"cd {REPO}" and "main.py" in lines(here.stdout)[-1]
  assert module.stdout == here.stdout == elsewhere.stdout
