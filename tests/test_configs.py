"""The paper's experiment configs (configs/*.py): they load, and their values match Table C.1.

Values of runs the authors' scripts cover are pinned against those scripts in
tests/test_authors_runs.py; here: loading, the local variants, Table B.2's ablation rows and the
Section 6.1 pool (no scripts released).
"""

import importlib.util
import math
import pathlib

import pytest

from configs import common
from pf_jax import config_validation

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name):
  spec = importlib.util.spec_from_file_location(f"_cfg_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


VIT_IMAGENET_METHODS = [
  "adamw",
  "sam_steep",
  "sam_obf",
  "gsam_steep",
  "gsam_obf",
  "asam_steep",
  "asam_obf",
  "random",
  "shrink_perturb",
  "label_smooth",
]
ALPHA_ABLATION = [
  "obf_alpha_0",
  "obf_alpha_1e-5",
  "obf_alpha_1e-4",
  "obf_alpha_1e-3",
  "obf_alpha_1e-2",
  "obf_alpha_1e-1",
  "obf_alpha_1",
  "obf_lam1e-3",
]
RESNET_IMAGENET_METHODS = ["sgd"] + VIT_IMAGENET_METHODS[1:]
AUTHORS_FIVE = ["sam_steep", "sam_obf", "gsam_steep", "gsam_obf"]  # plus the base optimizer

# (config file, the args before ",local"), every method of every config.
ARGS = (
  [("vit_s32_imagenet", m) for m in VIT_IMAGENET_METHODS + ALPHA_ABLATION]
  + [("vit_s16_imagenet", m) for m in ["adamw"] + AUTHORS_FIVE]
  + [("resnet50_imagenet", m) for m in RESNET_IMAGENET_METHODS]
  + [("resnet101_imagenet", m) for m in ["sgd"] + AUTHORS_FIVE]
  + [
    ("cifar_finetune", f"{model},{ds},{m}")
    for model in ("vit_s32", "resnet50")
    for ds in ("cifar10", "cifar100")
    for m in ("none", "sam_steep", "sam_obf")
  ]
  + [("cifar10_msweep", f"{p},{2**k}") for p in ("steep", "obf", "obf_gamma0") for k in range(10)]
)


def _keys(cfg, prefix=""):
  out = set()
  for k, v in cfg.items():
    out.add(prefix + k)
    if hasattr(v, "items"):
      out |= _keys(v, prefix + k + ".")
  return out


def test_method_tables_match_the_test_list():
  assert sorted(load("vit_s32_imagenet").METHODS) == sorted(VIT_IMAGENET_METHODS + ALPHA_ABLATION)
  assert sorted(load("vit_s16_imagenet").METHODS) == sorted(["adamw"] + AUTHORS_FIVE)
  assert sorted(load("resnet50_imagenet").METHODS) == sorted(RESNET_IMAGENET_METHODS)
  assert sorted(load("resnet101_imagenet").METHODS) == sorted(["sgd"] + AUTHORS_FIVE)


def _check_loaded(name, arg, local):
  c = load(name).get_config(arg + (",local" if local else ""))
  # No typo'd field: exactly the fields of the base config.
  assert _keys(c) == _keys(common.base_config())
  # Every value allowed (the trainer's own one-line checks), on 8 devices and 1 process.
  config_validation.validate(c, 8, 1)
  if c.sam.perturbation == "none":
    assert c.sam.gsam_alpha == 0 and c.sam.asam == "none"
  if local:
    assert c.dataset == "digits" and c.eval_datasets == ("digits",)
    resnet = name.startswith("resnet") or arg.startswith("resnet")
    assert c.model == ("resnet_tiny" if resnet else "vit_ti4")
    assert c.image_size == 32 and c.global_batch_size == 16 and c.num_train_steps > 0
  else:
    assert c.model in ("vit_s32", "vit_s16", "resnet50", "resnet101")
    assert c.image_size == 224
    assert c.num_train_steps is None and c.warmup_steps is None


def test_every_config_and_its_local_variant_load_and_validate():
  """Every method of every paper config, full and local: the base config's fields exactly, every
  value valid (config_validation, 8 devices), local variants tiny and offline. (Their values are
  pinned row by row in test_train_reference and test_authors_runs.)"""
  problems = []
  for name, arg in ARGS:
    for local in (False, True):
      try:
        _check_loaded(name, arg, local)
      except Exception as e:  # noqa: BLE001  (collect every row's problem)
        problems.append(f"{name}:{arg}{',local' if local else ''}: {type(e).__name__}: {e}")
  assert not problems, "\n".join(problems)
  assert len(ARGS) == 18 + 5 + 10 + 5 + 12 + 30  # vit_s32, vit_s16, resnet50, resnet101, ft, sweep


def test_local_keeps_method_and_runs_offline():
  full = load("vit_s32_imagenet").get_config("gsam_obf")
  small = load("vit_s32_imagenet").get_config("gsam_obf,local")
  assert full.dataset == "imagenet2012"
  # The embedded digits (built offline), resized to the tiny model's 32x32.
  assert small.dataset == "digits" and small.eval_datasets == ("digits",)
  for k in ("perturbation", "rho_max", "rho_min", "obf_lambda", "obf_gamma", "gsam_alpha"):
    assert small.sam[k] == full.sam[k]
  assert small.loss == full.loss and small.head_bias_init == full.head_bias_init


def test_default_args():
  assert load("vit_s32_imagenet").get_config().sam.perturbation == "obf"
  assert load("resnet50_imagenet").get_config(None).sam.perturbation == "obf"
  c = load("cifar_finetune").get_config()
  assert (c.model, c.dataset, c.sam.perturbation) == ("vit_s32", "cifar10", "obf")
  c = load("cifar10_msweep").get_config()
  assert (c.sam.perturbation, c.sam.m) == ("obf", 64)


# ---- Table C.1 spot checks (hand-written expected values) ------------------------------------

VIT_IMAGENET_EVAL = (
  "imagenet2012",
  "imagenet2012_real",
  "imagenet_v2",
  "imagenet_r",
  "imagenet_sketch",
)


@pytest.mark.parametrize(
  "name,model",
  [
    ("vit_s32_imagenet", "vit_s32"),
    ("vit_s16_imagenet", "vit_s16"),
    ("resnet50_imagenet", "resnet50"),
    ("resnet101_imagenet", "resnet101"),
  ],
)
def test_imagenet_data(name, model):
  c = load(name).get_config("sam_obf")
  assert c.model == model and c.image_size == 224
  assert c.dataset == "imagenet2012" and c.eval_datasets == VIT_IMAGENET_EVAL
  assert c.init_from is None


@pytest.mark.parametrize(
  "method,alpha",
  [
    ("obf_alpha_0", 0.0),
    ("obf_alpha_1e-5", 1e-5),
    ("obf_alpha_1e-4", 1e-4),
    ("obf_alpha_1e-3", 1e-3),
    ("obf_alpha_1e-2", 1e-2),
    ("obf_alpha_1e-1", 0.1),
    ("obf_alpha_1", 1.0),
  ],
)
def test_vit_s32_fixed_alpha_ablation(method, alpha):
  c = load("vit_s32_imagenet").get_config(method)
  assert c.sam.perturbation == "obf" and c.sam.obf_alpha == alpha
  assert c.sam.rho_max == 0.6 and c.sam.rho_min is None


def test_vit_s32_lambda_ablation_row():
  c = load("vit_s32_imagenet").get_config("obf_lam1e-3")
  assert c.sam.perturbation == "obf" and c.sam.obf_alpha is None
  assert c.sam.obf_lambda == 1e-3 and c.sam.obf_gamma == 1


@pytest.mark.parametrize("k", range(10))
def test_msweep(k):
  cfg = load("cifar10_msweep").get_config
  for p, perturbation, gamma in [
    ("steep", "steepest", None),
    ("obf", "obf", 1.0),
    ("obf_gamma0", "obf", 0.0),
  ]:
    c = cfg(f"{p},{2**k}")
    assert c.sam.m == 2**k and c.sam.perturbation == perturbation
    assert c.model == "vit_s32" and c.dataset == "cifar10" and c.eval_datasets == ("cifar10",)
    assert c.image_size == 224 and c.global_batch_size == 512
    assert c.num_epochs == 300 and c.warmup_epochs == 32
    assert c.optimizer == "adamw" and c.loss == "sigmoid_xent" and c.weight_decay == 1.2
    assert c.lr_max == c.lr_min == 3e-4  # without decay
    assert c.clip_grad_norm == 1.0 and c.head_bias_init == -10
    assert c.sam.rho_max == 0.2 and c.sam.rho_min is None
    # "every 25th epoch" (Section 6.1): 25 * 50 000 / 512 = 2441.4 steps.
    assert c.analysis.collect_every_steps == 2441
    if gamma is not None:
      assert math.isclose(c.sam.obf_lambda, 1 / 3) and c.sam.obf_gamma == gamma
    local = cfg(f"{p},{2**k},local")
    assert local.sam.m == (2**k if 2**k <= 16 else 4)


@pytest.mark.parametrize(
  "name,arg,bad",
  [
    ("vit_s32_imagenet", "sam_bogus", "sam_bogus"),
    ("vit_s16_imagenet", "obf_alpha_1,local", "obf_alpha_1"),  # ablation is ViT-S/32 only
    ("vit_s16_imagenet", "asam_obf", "asam_obf"),  # no such run in the authors' scripts
    ("resnet101_imagenet", "random", "random"),
    ("resnet50_imagenet", "adamw", "adamw"),
    ("resnet101_imagenet", "nope", "nope"),
    ("cifar_finetune", "vit_s32,cifar10,gsam_obf", "gsam_obf"),
    ("cifar_finetune", "vit_s16,cifar10,sam_obf", "vit_s16"),
    ("cifar_finetune", "resnet50,svhn,sam_obf", "svhn"),
    ("cifar10_msweep", "asam,64", "asam"),
    ("cifar10_msweep", "obf,3", "3"),
    ("cifar10_msweep", "obf,1024", "1024"),
    ("vit_s32_imagenet", "sam_obf,lcoal", "lcoal"),  # a typo is not silently dropped
    ("resnet50_imagenet", "sam_obf,sam_steep", "sam_steep"),
  ],
)
def test_unknown_raises(name, arg, bad):
  with pytest.raises(ValueError, match=bad):
    load(name).get_config(arg)


def test_default_demo_is_the_reproduction_row_with_the_search_winners():
  """REPORT.md's default-demo numbers are the reproduction's ASAM-STEEP digits row: the configs
  differ only in the searched winners and in fields that leave training unchanged."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from configs import reproduce  # pylint: disable=g-import-not-at-top
  from pf_jax import workdir  # pylint: disable=g-import-not-at-top

  a = workdir.flatten(default.get_config().to_dict())
  b = workdir.flatten(reproduce.get_config("digits,asam_steep").to_dict())
  differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
  safe = {k for k in differ if k in workdir.SAFE_TO_CHANGE or k.startswith("analysis.")}
  assert differ - safe == {"lr_max", "sam.rho_max"}
  assert (a["lr_max"], a["sam.rho_max"], a["sam.asam"]) == (1e-2, 0.3, "after")


def test_eval_image_size_is_the_resnets_own():
  """validate_rn*.sh evaluate ResNets at 288; a ViT's position embeddings fix its size."""
  from pf_jax import config_validation  # pylint: disable=g-import-not-at-top

  c = load("resnet50_imagenet").get_config("sgd")
  assert (c.image_size, c.eval_image_size) == (224, 288)
  config_validation.validate(c)
  assert load("resnet50_imagenet").get_config("sgd,local").eval_image_size is None
  c = load("vit_s32_imagenet").get_config("adamw")
  c.eval_image_size = 288
  with pytest.raises(config_validation.ConfigError, match=r"^config\.eval_image_size: 288 "):
    config_validation.validate(c)
