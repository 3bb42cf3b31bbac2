"""main.py as a user meets it: one-line errors before anything compiles, --help, quiet logs.

Each invalid input runs `main.py` in its own process with JAX_LOG_COMPILES=1 (JAX then logs
every compilation to stderr) on the 8 simulated devices of conftest.py, and must exit non-zero
with exactly one stderr line, `error: <field>: ...`, naming the field the user typed. The
processes are forked from a server that has done main.py's imports (tests/forked_main.py).
"""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import default
from pf_jax import cli
from pf_jax import config_fields
from pf_jax import config_validation
from pf_jax import experiment
from pf_jax import reporting
from pf_jax import workdir
from tests import forked_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def main_py():
  """`main_py(args)`: `python main.py *args` with JAX_LOG_COMPILES=1, as a CompletedProcess."""
  with forked_main.MainServer(dict(os.environ, JAX_LOG_COMPILES="1")) as server:
    yield server.run


# (command line without --workdir, the field its error must name). Defaults: configs/default.py
# (digits, global batch 128, lr 1e-2 -> 3e-5, SAM with rho 0.03, m 32), 8 devices.
INVALID = [
  # Fields named by their config name, not the SAM library's argument.
  (["--config.sam.obf_gamma=1.5"], "config.sam.obf_gamma"),
  (["--config.sam.obf_lambda=1.0"], "config.sam.obf_lambda"),
  (["--config.sam.obf_alpha=1.5"], "config.sam.obf_alpha"),
  (["--config.sam.asam=sideways"], "config.sam.asam"),
  (["--config.sam.gsam_alpha=5"], "config.sam.gsam_alpha"),
  (["--config.sam.perturbation=sharpest"], "config.sam.perturbation"),
  (["--config.num_epochs=-1"], "config.num_epochs"),
  (["--config.warmup_epochs=-1"], "config.warmup_epochs"),
  # Unknown fields, malformed values and flags.
  (["--config.sam.rhoo=0.1"], "config.sam.rhoo"),
  (["--config.sam=1"], "config.sam"),
  (["--config.global_batch_size=abc"], "config.global_batch_size"),
  (["--config.mixed_precision=maybe"], "config.mixed_precision"),
  (["--config.lr_max"], "config.lr_max"),
  (["--workdirr=/tmp/x"], "--workdirr"),
  (["extra"], "'extra'"),
  # Ranges and finiteness.
  (["--config.global_batch_size=0"], "config.global_batch_size"),
  (["--config.eval_batch_size=0"], "config.eval_batch_size"),
  (["--config.image_size=0"], "config.image_size"),
  (["--config.crop_area_min=2"], "config.crop_area_min"),
  (["--config.lr_max=nan"], "config.lr_max"),
  (["--config.sam.rho_max=inf"], "config.sam.rho_max"),
  (["--config.num_epochs=0"], "config.num_epochs"),
  (["--config.num_train_steps=0"], "config.num_train_steps"),
  (["--config.b1=1.5"], "config.b1"),
  (["--config.shuffle_buffer=0"], "config.shuffle_buffer"),
  (["--config.grad_accum_steps=0"], "config.grad_accum_steps"),
  (["--config.analysis.dataset=mnist"], "config.analysis.dataset"),
  (
    ["--config.analysis.collect_every_steps=10", "--config.analysis.dataset=cifar100"],
    "config.analysis.dataset",
  ),  # 100 classes, digits 10
  (["--config.analysis.sharpness_tol=0"], "config.analysis.sharpness_tol"),
  # Names.
  (["--config.model=vit_huge"], "config.model"),
  (["--config.dataset=imagenet_v2"], "config.dataset"),  # evaluation-only
  (["--config.eval_datasets=digits,mnist"], "config.eval_datasets"),
  (["--config.init_from=/nonexistent/run"], "config.init_from"),
  # Rules across fields.
  (["--config.warmup_epochs=100"], "config.warmup_epochs"),  # longer than the 40 epochs
  (["--config.num_train_steps=10", "--config.warmup_steps=11"], "config.warmup_steps"),
  (["--config.lr_min=1.0"], "config.lr_min"),
  (["--config.sam.rho_min=0.5"], "config.sam.rho_min"),  # > rho_max 0.1
  (
    ["--config.lr_max=0.003", "--config.lr_min=0.003", "--config.sam.rho_min=0.05"],
    "config.sam.rho_min",
  ),  # lr constant
  (["--config.sam.m=3"], "config.sam.m"),  # per-device batch 16
  (["--config.global_batch_size=100"], "config.global_batch_size"),  # 8 devices
  (["--config.grad_accum_steps=3"], "config.global_batch_size"),
  (["--config.eval_batch_size=12"], "config.eval_batch_size"),
  (["--config.image_size=9"], "config.image_size"),  # vit_digits: patches of 2
  (["--config.sam.perturbation=none", "--config.sam.asam=before"], "config.sam.asam"),
  # Config files and their args.
  (["--config=configs/nope.py"], "--config"),
  (["--config=configs/vit_s32_imagenet.py:bogus"], "--config"),
  (["--config=configs/vit_s32_imagenet.py:sam_obf,lcoal"], "--config"),
  (["--config=configs/cifar_finetune.py:vit_s16,cifar10,sam_obf"], "--config"),
  (["--config=configs/cifar10_msweep.py:obf,3"], "--config"),
  (["--config=configs/default.py:local"], "--config"),
]

# More of the same kinds (slow: about a second each).
INVALID_MORE = [
  (["--config.sam.asam_eta=-1"], "config.sam.asam_eta"),
  (["--config.lr=0.1"], "config.lr"),
  (["--config.seed=1.5"], "config.seed"),
  (["--config.crop_area_min=0"], "config.crop_area_min"),
  (["--config.sam.rho_max=-1"], "config.sam.rho_max"),
  (["--config.head_bias_init=-inf"], "config.head_bias_init"),
  (["--config.momentum=1.0"], "config.momentum"),
  (["--config.label_smoothing=1.0"], "config.label_smoothing"),
  (["--config.shrink_perturb=2"], "config.shrink_perturb"),
  (["--config.seed=-1"], "config.seed"),
  (["--config.keep_checkpoints=0"], "config.keep_checkpoints"),
  (["--config.eval_every_steps=0"], "config.eval_every_steps"),
  (["--config.analysis.sharpness_tol=0"], "config.analysis.sharpness_tol"),
  (["--config.loss=hinge"], "config.loss"),
  (["--config.optimizer=adam"], "config.optimizer"),
  (["--config.sam.gsam_alpha=-0.1"], "config.sam.gsam_alpha"),
  (["--config.sam.chunk_mode=loop"], "config.sam.chunk_mode"),
  (["--config=configs/vit_s16_imagenet.py:obf_alpha_1"], "--config"),
  (["--config.sam.m=256"], "config.sam.m"),  # would span 16 of 8 devices
  (["--config.sam.rho_min=-1"], "config.sam.rho_min"),  # off is None, not a negative number
  (["--config.sam.asam="], "config.sam.asam"),  # off is "none"
]


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "a_file"
  path.write_text("")
  return str(path)


def _check_one_line_error(r, field):
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "Compiling" not in r.stderr and "Finished tracing" not in r.stderr, r.stderr[-2000:]
  lines = r.stderr.splitlines()
  assert len(lines) == 1, r.stderr[-2000:]
  assert lines[0].startswith(f"error: {field}:"), lines[0]
  assert r.stdout == ""


@pytest.mark.parametrize("args,field", INVALID, ids=[" ".join(a) for a, _ in INVALID])
def test_invalid_input_is_one_line_before_compiling(main_py, args, field, tmp_path):
  r = main_py([f"--workdir={tmp_path / 'run'}", *args])
  _check_one_line_error(r, field)
  if field.startswith("config.") and r.returncode == 2:
    assert f" {config_validation.DASH} " in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args,field", INVALID_MORE, ids=[" ".join(a) for a, _ in INVALID_MORE])
def test_more_invalid_inputs(main_py, args, field, tmp_path):
  _check_one_line_error(main_py([f"--workdir={tmp_path / 'run'}", *args]), field)


def test_the_table_has_40_cases():
  assert len(INVALID) >= 40


@pytest.mark.parametrize("workdir", ["{file}", "{file}/sub", "/proc/pf_jax_cannot_create"])
def test_bad_workdir_is_one_line(main_py, workdir, a_file):
  _check_one_line_error(main_py([f"--workdir={workdir.format(file=a_file)}"]), "--workdir")


def test_missing_workdir_is_one_line(main_py):
  _check_one_line_error(main_py([]), "--workdir")


def test_dataset_not_prepared_is_one_line_before_compiling(main_py, tmp_path):
  """A dataset missing from data_dir stops the run before anything compiles, before TensorFlow's
  import (pf_jax/preflight.py) and before the workdir is created (issue 30: it was left empty)."""
  r = main_py(
    [
      f"--workdir={tmp_path / 'run'}",
      "--config.dataset=cifar10",
      "--config.eval_datasets=cifar10",
      "--config.image_size=32",
      f"--config.data_dir={tmp_path / 'empty'}",
    ]
  )
  _check_one_line_error(r, "config.dataset")
  assert f"'cifar10' — not prepared in {tmp_path / 'empty'} (config.data_dir=" in r.stderr
  assert "tfds build cifar10" in r.stderr
  assert not (tmp_path / "run").exists()


def test_compilations_would_be_seen():
  """The no-compilation check is not vacuous: JAX_LOG_COMPILES reports a jit to stderr."""
  r = subprocess.run(
    [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1)"],
    env=dict(os.environ, JAX_LOG_COMPILES="1"),
    capture_output=True,
    text=True,
  )
  assert "Compiling" in r.stderr


def test_verbose_shows_the_traceback(main_py, tmp_path):
  r = main_py([f"--workdir={tmp_path}", "--config.sam.obf_gamma=1.5", "--verbose"])
  assert r.returncode == 2 and "Traceback" in r.stderr
  assert r.stderr.splitlines()[-1].startswith("error: config.sam.obf_gamma:")


def test_check_only_accepts_every_paper_config(main_py):
  for spec in ["configs/default.py"] + [
    f"configs/{n}.py" for n in cli.PAPER_CONFIGS + cli.OTHER_CONFIGS
  ]:
    r = main_py(["--check_only", f"--config={spec}"])
    assert r.returncode == 0 and r.stdout.startswith("config OK\n"), (spec, r.stderr)


def test_check_only_states_the_method_and_creates_nothing(main_py, tmp_path):
  """The resolved run: m 4 of the local variant spans 2 of 8 devices (per-device batch 16 / 8 =
  2, by hand), the note says the variant changed m from 64; the workdir is not created."""
  workdir = tmp_path / "new" / "run"
  r = main_py(
    ["--check_only", "--config=configs/cifar10_msweep.py:obf,64,local", f"--workdir={workdir}"]
  )
  assert r.returncode == 0, r.stderr
  lines = dict(l.split(": ", 1) for l in r.stdout.splitlines()[1:])
  assert "20 steps (warmup 2)" in lines["run"] and "global batch 16 on 8 devices" in lines["run"]
  method = lines["method"]
  assert method.startswith("SAM with OBF (lambda ") and "rho " in method
  assert "m 4 (one chunk spans 2 devices)" in method and "no accumulation" in method
  assert "loss " in method
  assert "smoke test" in lines["note"] and "sam.m 64 -> 4" in lines["note"]
  assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
  "devices,chunks", [(1, "4 chunks per device, unroll"), (8, "one chunk spans 2 devices")]
)
def test_method_of_the_default_config(devices, chunks):
  """configs/default.py by hand: batch 128, m 32: 128 per device -> 4 chunks ("auto" unrolls up to
  16), or 16 per device on 8 devices -> one chunk spans 2."""
  method = reporting.describe_method(default.get_config(), devices)
  assert method == (
    f"ASAM (after, eta 0.01) with steepest ascent, rho 0.3 constant, m 32 ({chunks}), "
    "no accumulation; loss sigmoid_xent; optimizer adamw (lr 0.01 -> 3e-05, weight decay 0.05)"
  )
  c = default.get_config()
  c.sam.rho_min, c.grad_accum_steps, c.sam.perturbation = 0.0, 2, "obf"
  method = reporting.describe_method(c, 1)
  assert "OBF (lambda" in method and "rho 0.3 -> 0 (proportional to the lr)" in method
  assert "m 32 (2 chunks per device, unroll), accumulation over 2 micro-batches" in method


def test_init_from_without_a_checkpoint_is_refused_before_compiling(tmp_path):
  """An existing directory with no step folder: the config error main.py prints before compiling."""
  c = default.get_config()
  c.init_from = str(tmp_path)
  with pytest.raises(config_validation.ConfigError, match="no step folder") as e:
    config_validation.validate(c, 8, 1)
  assert str(e.value).startswith(f"config.init_from: '{tmp_path}' — a workdir or checkpoint")
  (tmp_path / "checkpoints" / "12").mkdir(parents=True)
  config_validation.validate(c, 8, 1)


def test_help_lists_fields_defaults_and_paper_configs(main_py):
  r = main_py(["--help"])
  assert r.returncode == 0, r.stderr
  for field in config_fields.FIELDS:
    assert f"--config.{field.name}=" in r.stdout and field.meaning in r.stdout, field.name
  assert "--config.global_batch_size=128" in r.stdout  # configs/default.py's value
  assert "--config.sam.perturbation='steepest'" in r.stdout
  for name in cli.PAPER_CONFIGS + cli.OTHER_CONFIGS:
    assert f"configs/{name}.py" in r.stdout
  for method in ("gsam_obf", "asam_steep", "obf_alpha_1e-2", "shrink_perturb", "obf_gamma0"):
    assert method in r.stdout
  # With --config, the defaults are that config's.
  r = main_py(["--help", "--config=configs/resnet50_imagenet.py:sgd"])
  assert "--config.global_batch_size=4096" in r.stdout and "--config.model='resnet50'" in r.stdout


def test_every_library_argument_is_fed_by_one_declared_field():
  """What `experiment` builds takes exactly the declared arguments (a typo would be a TypeError)."""
  c = default.get_config()
  with c.unlocked():
    c.sam.perturbation, c.sam.rho_min, c.shrink_perturb, c.clip_grad_norm = "obf", 0.0, 0.1, 1.0
  exp = experiment.build(c, num_classes=10, num_train_examples=1438, num_devices=8)
  assert exp.spec.m == c.sam.m and exp.spec.asam == "after" and exp.spec.asam_eta == 0.01
  want = {"lam": c.sam.obf_lambda, "gamma": 1.0, "predictions": c.sam.obf_predictions}
  assert config_fields.library_kwargs(c, "obf") == want
  assert config_fields.field_for("SamSpec", "m") == "sam.m"
  assert config_fields.field_for("obf_fixed_alpha", "alpha") == "sam.obf_alpha"
  c.sam.asam = "none"  # the named choice is the library's None
  assert config_fields.library_kwargs(c, "SamSpec")["asam"] is None


@pytest.mark.parametrize(
  "field,old_sentinel",
  [
    ("sam.rho_min", -1.0),
    ("sam.obf_alpha", -1.0),
    ("sam.asam", ""),
    ("num_train_steps", -1),
    ("warmup_steps", -1),
    ("init_from", ""),
    ("analysis.dataset", ""),
    ("clip_grad_norm", 0.0),
  ],
)
def test_off_is_none_not_a_sentinel(field, old_sentinel):
  """An option that can be off is None (or "none"); the old special values are refused."""
  c = default.get_config()
  holder, leaf = (c, field) if "." not in field else (c[field.split(".")[0]], field.split(".")[1])
  holder[leaf] = "none" if field == "sam.asam" else None
  config_validation.validate(c, num_devices=8)
  holder[leaf] = old_sentinel
  with pytest.raises(config_validation.ConfigError, match=f"^config.{re.escape(field)}: "):
    config_validation.validate(c, num_devices=8)


def test_a_stored_config_with_old_off_values_reads_as_none(tmp_path):
  """Workdirs written before None meant off still resume with the same config."""
  c = default.get_config()
  workdir.save_config(tmp_path, c)
  stored = json.loads((tmp_path / "config.json").read_text())
  stored["sam"]["rho_min"], stored["sam"]["asam"], stored["num_train_steps"] = -1.0, "", -1
  stored["sam"]["obf_alpha"], stored["init_from"] = -1.0, ""
  (tmp_path / "config.json").write_text(json.dumps(stored))
  c.sam.asam = "none"
  assert workdir.config_differences(workdir.load_config(tmp_path), c) == []


@pytest.mark.parametrize(
  "seconds,text",
  [(0.4, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"), (3599, "59 min 59 s"), (7500, "2 h 05 min")],
)
def test_eta_is_in_seconds_under_a_minute(seconds, text):
  assert reporting.format_duration(seconds) == text


@pytest.mark.parametrize(
  "field,value", [("sam.obf_gamma", 1.5), ("sam.obf_lambda", 1.0), ("sam.obf_alpha", 2.0)]
)
def test_library_errors_name_the_config_field(field, value):
  """Past the field rules (here: bypassed), the library's error still names the config field."""
  c = default.get_config()
  c.sam.perturbation = "obf"
  c.sam.obf_gamma, c.sam.obf_lambda, c.sam.obf_alpha = 1.0, 0.1, None
  c.sam[field[4:]] = value
  with pytest.raises(config_validation.ConfigError) as err:
    config_validation._check_sam(c, 8)  # pylint: disable=protected-access
  assert str(err.value).startswith(f"config.{field}: {value}")


@pytest.mark.heavy  # scheduled first (tests/conftest.py)
@pytest.mark.long  # CI runs it (-m long); not in the default suite
def test_default_run_logs(tmp_path):
  """Quiet useful logs: no library INFO lines; start, train lines with ETA, eval, checkpoint, summary."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_LOG_COMPILES": "0"}
  env = dict(os.environ, **env)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user runs it
  r = subprocess.run(
    [
      sys.executable,
      "main.py",
      f"--workdir={tmp_path / 'run'}",
      f"--config.data_dir={tmp_path / 'data'}",
      "--config.num_train_steps=40",
      "--config.warmup_steps=4",
      "--config.log_every_steps=10",
      "--config.eval_every_steps=20",
      "--config.checkpoint_every_steps=20",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.fullmatch(r"eval/digits/loss=\d+\.\d{4} eval/digits/top1=\d\.\d{4}\n", r.stdout), (
    r.stdout
  )
  lines = r.stderr.splitlines()
  # Library INFO chatter: orbax/clu/TF/absl (glog-style "I1123 ..." lines, oneDNN, work unit notes).
  for noise in (
    r"^I\d{4} ",
    r"oneDNN",
    r"absl::InitializeLog",
    r"orbax|checkpoint_manager|Saving item",
    r"Setting work unit notes",
    r"Generating splits|Shuffling|\[A",
  ):
    assert not any(re.search(noise, l) for l in lines), (noise, r.stderr)
  body = [l.split(" ", 1)[1] for l in lines if re.match(r"\d\d:\d\d:\d\d ", l)]
  assert len(body) == len(lines), r.stderr  # every line is one of ours (time-stamped)
  # What the tens of seconds before the start line are spent on (silent before issue 30).
  assert body[:3] == [
    "importing TensorFlow and the training system",
    f"Preparing digits in {tmp_path / 'data'} (offline, once).",
    "initializing vit_digits (compiling its init)",
  ], body
  assert any(
    l.startswith("start: vit_digits (")
    and "40 steps" in l
    and "digits 1438 train" in l
    and "; 1 device;" in l
    and "method: ASAM (after, eta 0.01) with steepest ascent, rho 0.3 constant" in l
    for l in body
  ), body
  train = [l for l in body if l.startswith("train step ")]
  rho = re.escape(f"{default.get_config().sam.rho_max:.3g}")
  assert [int(l.split()[2].split("/")[0]) for l in train] == [10, 20, 30, 40]
  assert all(
    re.search(
      rf"loss \d+\.\d+ top1 [\d.]+ lr \S+ rho {rho}, [\d.]+ steps/s, ETA (\d+ min )?\d+ s$", l
    )
    for l in train
  ), train
  assert [l.split(":")[0] for l in body if l.startswith("eval ")] == [
    "eval step 20",
    "eval step 40",
  ]
  assert sum(l.startswith("checkpoint step ") for l in body) == 2
  assert body[-1].startswith("done: step 40") and "eval/digits/top1" in body[-1]
  assert [l for l in body if l.startswith("compil")] == [
    "compiling the train step (the first step waits for it)",
    body[5],
  ] and re.fullmatch(r"compiled the train step and ran step 1 in (\d+ min )?[\d.]+ s", body[5]), (
    body
  )
  assert len(lines) <= 16, r.stderr


def test_an_unknown_field_suggests_the_field_that_means_it():
  """By spelling (difflib), else by the words of a field's meaning (issue 30: learning_rate)."""
  for typed, field in (("learning_rate", "lr_max"), ("sam.rhoo", "sam.rho_min")):
    with pytest.raises(config_validation.ConfigError) as e:
      cli.build_config(None, [(typed, "0.1")])
    assert str(e.value) == f"config.{typed}: '0.1' — unknown field; did you mean {field}?"


def test_reporter_eta_uses_the_steady_rate(monkeypatch):
  """Compilation (10 s) and evaluation (5 s) are not training speed: with steps of 0.1 s the ETA
  is remaining steps x 0.1 s from the first train line on (by hand), and steps/s is 10."""
  clock = [0.0]
  monkeypatch.setattr(reporting.time, "time", lambda: clock[0])
  lines = []
  report = reporting.Reporter(total_steps=101, start_step=0)
  monkeypatch.setattr(report, "_info", lambda msg, *args: lines.append(msg % args))
  report.compiling()
  clock[0] = 10.0
  report.compiled(1)
  assert lines[-1] == "compiled the train step and ran step 1 in 10.0 s"
  clock[0] += 0.1 * 10  # steps 2..11
  assert report.train(11, {"train/loss": 1.0}) == pytest.approx(10.0)
  assert lines[-1].endswith("10.00 steps/s, ETA 9 s")  # 90 steps left
  report.eval(11, {"eval/digits/top1": 0.5}, 5.0)
  clock[0] += 5.0 + 0.1 * 40  # evaluation, then steps 12..51
  assert report.train(51, {"train/loss": 1.0}) == pytest.approx(10.0)
  assert lines[-1].endswith("ETA 5 s")  # 50 steps left


def test_start_line_says_devices_and_resume_in_its_own_words(monkeypatch):
  lines = []
  report = reporting.Reporter(total_steps=10, start_step=4)
  monkeypatch.setattr(report, "_info", lambda msg, *args: lines.append(msg % args))
  report.start("m", 10, "digits", 100, {"digits": 50}, 1, 1, 1, "/w", method="SAM ...", note="n")
  report.resumed(4, "/w/checkpoints")
  assert "; 1 device; method: SAM ...; n; workdir /w" in lines[0]
  assert lines[1] == "resumed: step 4 from /w/checkpoints"


@pytest.mark.skipif(
  __import__("importlib").util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) absent"
)
def test_libtpu_installed_on_a_machine_without_a_tpu_writes_nothing():
  """With the tpu extra installed (for --compile_for) and no TPU here, libtpu would probe for a TPU
  VM at JAX's first device query and write errors to stderr; main.py keeps JAX to the CPU."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  r = subprocess.run(
    [sys.executable, "main.py", "--check_only"], cwd=ROOT, env=env, capture_output=True, text=True
  )
  assert r.returncode == 0 and r.stdout.startswith("config OK"), r.stderr
  assert r.stderr == "", r.stderr
