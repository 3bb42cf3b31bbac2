"""Every paper config is the authors' run.

The expected values are written from the authors' release (BorealisAI/perturbed-forgetting), not
from our configs: each run is its command line in scripts/run_experiments.sh on top of its
scripts/train_*.sh / finetune_*.sh flags and train.py's argparse defaults, and `expected`
translates those flags into our config fields by the meaning train.py gives them. Sharpness
settings are those of scripts/compute_hessian_*.sh (validate.py).
"""

import math
import shlex

import pytest

from configs import cifar_finetune
from configs import resnet50_imagenet
from configs import resnet101_imagenet
from configs import vit_s16_imagenet
from configs import vit_s32_imagenet

# train.py's argparse defaults for the flags that matter (optim/sam.py, loss/output_bias_forget.py).
TRAIN_PY = (
  "--opt sgd --momentum 0.9 --rho 0.6 --min-rho 0.0 --rho-policy constant --gsam-alpha 0 "
  "--obf-C 1000 --obf-gamma 1 --perturb-loss maximize --smoothing 0.0 --snp-factor 0 "
  "--min-lr 0 --scale 0.05 1.0"
)
# The scripts' own flags; BATCH_SIZE and SHARPNESS_M (m) are environment variables there.
SCRIPTS = {
  "train_vits32.sh": "--model vit_small_patch32_224 --bce-loss --epochs 300 --warmup-epochs 32 "
  "--head-init-bias -10.0 --lr 0.003 --min-lr 0.00003 --weight-decay 0.3 --clip-grad 1.0 "
  "--gsam-alpha 0 --min-rho 0.0 --rho 0.6 --obf-C 1000 BATCH_SIZE=4096 SHARPNESS_M=64",
  "train_rn50.sh": "--model resnet50 --epochs 90 --warmup-epochs 16 --lr 1.6 --min-lr 0.016 "
  "--momentum 0.9 --weight-decay 0.001 --gsam-alpha 0 --min-rho 0.02 --rho 0.04 --obf-C 1000 "
  "BATCH_SIZE=4096 SHARPNESS_M=64",
  "finetune_vits32_cifar.sh": "--model vit_small_patch32_224 --bce-loss --epochs 100 "
  "--warmup-epochs 5 --lr 0.003 --min-lr 0 --weight-decay 0 --momentum 0.9 --clip-grad 1.0 "
  "--gsam-alpha 0 --min-rho 0.0 --rho 0.05 --obf-C {C} BATCH_SIZE=512 SHARPNESS_M=64",
  "finetune_rn50_cifar.sh": "--model resnet50 --epochs 100 --warmup-epochs 5 --lr 0.01 "
  "--min-lr 0 --weight-decay 0 --momentum 0.9 --clip-grad 1.0 --gsam-alpha 0 --min-rho 0.0 "
  "--rho 0.1 --obf-C {C} BATCH_SIZE=512 SHARPNESS_M=64",
}
SCRIPTS["train_vits16.sh"] = SCRIPTS["train_vits32.sh"].replace("patch32", "patch16")
SCRIPTS["train_rn101.sh"] = SCRIPTS["train_rn50.sh"].replace("resnet50", "resnet101")

# scripts/run_experiments.sh: (our config, its arg) -> (script, the run's own flags).
VITS32 = {
  "adamw": "--opt adamw",
  "label_smooth": "--opt adamw --smoothing 0.1",
  "shrink_perturb": "--opt adamw --snp-factor 1e-5",
  "sam_steep": "--opt sam_adamw --rho-policy lr_prop --perturb-loss maximize",
  "sam_obf": "--opt sam_adamw --perturb-loss obf",
  "random": "--opt randsam_adamw --perturb-loss maximize",
  "gsam_steep": "--opt sam_adamw --gsam-alpha 0.4 --rho-policy lr_prop --perturb-loss maximize",
  "gsam_obf": "--opt sam_adamw --gsam-alpha 0.4 --backup-normalized --perturb-loss obf",
  "asam_steep": "--opt sam_adamw --adaptive-sam --asam-after-norm --rho 6.0 --perturb-loss maximize",
  "asam_obf": "--opt sam_adamw --adaptive-sam --asam-after-norm --rho 6.0 --perturb-loss obf "
  "--obf-gamma 1e-12",
}
RN50 = {
  "sgd": "--opt sgdw",
  "label_smooth": "--opt sgdw --smoothing 0.1",
  "shrink_perturb": "--opt sgdw --snp-factor 1e-5",
  "sam_steep": "--opt sam_sgdw --rho-policy lr_prop --perturb-loss maximize",
  "sam_obf": "--opt sam_sgdw --perturb-loss obf --obf-gamma 1e-12",
  "random": "--opt randsam_sgdw --perturb-loss maximize",
  "gsam_steep": "--opt sam_sgdw --gsam-alpha 0.01 --backup-normalized --rho-policy lr_prop "
  "--perturb-loss maximize",
  "gsam_obf": "--opt sam_sgdw --gsam-alpha 0.01 --perturb-loss obf --obf-gamma 1e-12",
  "asam_steep": "--opt sam_sgdw --adaptive-sam --asam-before-norm --rho 0.8 --min-rho 0.4 "
  "--rho-policy lr_prop --perturb-loss maximize",
  "asam_obf": "--opt sam_sgdw --adaptive-sam --asam-before-norm --rho 0.8 --perturb-loss obf "
  "--obf-gamma 1e-12",
}
VITS16 = {
  "adamw": "--opt adamw",
  "sam_steep": "--opt sam_adamw --perturb-loss maximize",
  "sam_obf": "--opt sam_adamw --perturb-loss obf",
  "gsam_steep": "--opt sam_adamw --gsam-alpha 1.0 --rho-policy lr_prop --perturb-loss maximize",
  "gsam_obf": "--opt sam_adamw --gsam-alpha 0.4 --backup-normalized --perturb-loss obf",
}
RN101 = {k: RN50[k] for k in ("sgd", "sam_steep", "sam_obf", "gsam_steep", "gsam_obf")}
FINETUNE = {  # vits32c10_*, rn50c10_* (and c100): max2sgd / obf2sgd, adamw2* / sgd2*
  "vit_s32": {
    "none": "--opt sgd",
    "sam_steep": "--opt sam_sgd --perturb-loss maximize",
    "sam_obf": "--opt sam_sgd --perturb-loss obf --obf-gamma 1e-12",
  },
  "resnet50": {
    "none": "--opt sgd",
    "sam_steep": "--bce-loss --opt sam_sgd --perturb-loss maximize",
    "sam_obf": "--bce-loss --opt sam_sgd --perturb-loss obf --obf-gamma 1e-12",
  },
}
FINETUNE_SCRIPT = {"vit_s32": "finetune_vits32_cifar.sh", "resnet50": "finetune_rn50_cifar.sh"}

RUNS = (
  [(vit_s32_imagenet, m, "train_vits32.sh", f) for m, f in VITS32.items()]
  + [(vit_s16_imagenet, m, "train_vits16.sh", f) for m, f in VITS16.items()]
  + [(resnet50_imagenet, m, "train_rn50.sh", f) for m, f in RN50.items()]
  + [(resnet101_imagenet, m, "train_rn101.sh", f) for m, f in RN101.items()]
  + [
    (cifar_finetune, f"{model},{ds},{m}", FINETUNE_SCRIPT[model], f.replace("{C}", str(c)))
    for model, rows in FINETUNE.items()
    for ds, c in (("cifar10", 10), ("cifar100", 100))
    for m, f in rows.items()
  ]
)
MODELS = {
  "vit_small_patch32_224": "vit_s32",
  "vit_small_patch16_224": "vit_s16",
  "resnet50": "resnet50",
  "resnet101": "resnet101",
}
# The models' pretrained_cfg (models/vision_transformer.py, models/resnet.py), which train.py's
# resolve_data_config uses for normalization and the evaluation resize: ViT mean = std = 0.5
# (IMAGENET_INCEPTION_*), ResNet IMAGENET_DEFAULT_*; interpolation "bicubic" for both.
# validate.py (scripts/validate_*.sh) evaluates at the cfg's test_input_size: ResNet 288, ViT none.
MODEL_DATA = {
  "vit_small_patch32_224": ("minus_one_to_one", "bicubic", None),
  "vit_small_patch16_224": ("minus_one_to_one", "bicubic", None),
  "resnet50": ("imagenet", "bicubic", 288),
  "resnet101": ("imagenet", "bicubic", 288),
}


def parse(command: str) -> dict:
  """'--a 1 --b --c 2 3 ENV=4' -> {'a': '1', 'b': True, 'c': '2', 'ENV': '4'}; later flags win."""
  flags, key = {}, None
  for token in shlex.split(command):
    if token.startswith("--"):
      key = token[2:]
      flags[key] = True
    elif "=" in token:
      name, value = token.split("=")
      flags[name] = value
    elif key is not None and flags[key] is True:
      flags[key] = token  # the first value (--scale 0.05 1.0 -> 0.05)
  return flags


def expected(script: str, run: str, num_classes: int) -> dict:
  """Our config fields for one of the authors' command lines, by train.py's meaning."""
  f = parse(" ".join((TRAIN_PY, SCRIPTS[script].replace("{C}", str(num_classes)), run)))
  prefix, _, base = f["opt"].rpartition("_")
  assert base in ("adamw", "sgdw", "sgd") and prefix in ("", "sam", "randsam")
  if base == "sgd":  # torch SGD with weight decay 0 is SGDW with weight decay 0
    assert float(f["weight-decay"]) == 0
  out = {
    "model": MODELS[f["model"]],
    "optimizer": "adamw" if base == "adamw" else "sgdw",
    "loss": "sigmoid_xent" if f.get("bce-loss") else "softmax_xent",
    "label_smoothing": float(f["smoothing"]),
    # train.py's 0 (snp-factor, clip-grad): off, which our config writes None.
    "shrink_perturb": float(f["snp-factor"]) or None,
    "clip_grad_norm": float(f.get("clip-grad", 0.0)) or None,
    "global_batch_size": int(f["BATCH_SIZE"]),
    "num_epochs": float(f["epochs"]),
    "warmup_epochs": float(f["warmup-epochs"]),
    "lr_max": float(f["lr"]),
    "lr_min": float(f["min-lr"]),
    "weight_decay": float(f["weight-decay"]),
    "crop_area_min": float(f["scale"]),
    "image_normalization": MODEL_DATA[f["model"]][0],
    "eval_interpolation": MODEL_DATA[f["model"]][1],
    "eval_image_size": MODEL_DATA[f["model"]][2],
    # compute_hessian_*.sh: validate.py --split "train[:8192]", BATCH_SIZE=256, its defaults.
    "analysis.sharpness_examples": 8192,
    "analysis.sharpness_batch_size": 256,
    "analysis.sharpness_iters": 100,
    "analysis.sharpness_tol": 1e-4,
  }
  if "head-init-bias" in f:  # else the model's own head init (docs/fidelity.md)
    out["head_bias_init"] = float(f["head-init-bias"])
  if base != "adamw":
    out["momentum"] = float(f["momentum"])
  if not prefix:
    out["sam.perturbation"] = "none"
    return out
  steepest = f["perturb-loss"] == "maximize"
  out.update(
    {
      "sam.perturbation": "random" if prefix == "randsam" else "steepest" if steepest else "obf",
      "sam.m": int(f["SHARPNESS_M"]),
      "sam.rho_max": float(f["rho"]),
      "sam.rho_min": float(f["min-rho"]) if f["rho-policy"] == "lr_prop" else None,
      "sam.gsam_alpha": float(f["gsam-alpha"]),
      "sam.gsam_normalized_backup": bool(f.get("backup-normalized", False)),
      "sam.asam": (
        ("before" if f.get("asam-before-norm") else "after") if f.get("adaptive-sam") else "none"
      ),
      "sam.asam_eta": 0.0,  # optim/sam.py scales by |theta| alone
    }
  )
  if out["sam.perturbation"] == "obf":
    out.update(
      {
        "sam.obf_lambda": 1.0 / float(f["obf-C"]),
        "sam.obf_gamma": float(f["obf-gamma"]),
        "sam.obf_alpha": None,  # alpha from lambda and gamma
        "sam.obf_predictions": "sigmoid",  # OutputBiasForget(C, gamma): sigmoid=True
      }
    )
  return out


def _get(c, field):
  for part in field.split("."):
    c = c[part]
  return c


@pytest.mark.parametrize(
  "module,arg,script,run",
  RUNS,
  ids=[f"{m.__name__.split('.')[-1]}:{a}" for m, a, _, _ in RUNS],
)
def test_config_is_the_authors_run(module, arg, script, run):
  num_classes = {"cifar10": 10, "cifar100": 100}.get(arg.split(",")[1] if "," in arg else "", 1000)
  c = module.get_config(arg)
  want = expected(script, run, num_classes)
  got = {k: _get(c, k) for k in want}
  wrong = {
    k: (got[k], v)
    for k, v in want.items()
    if not (math.isclose(got[k], v, rel_tol=1e-12) if isinstance(v, float) else got[k] == v)
  }
  assert not wrong, f"(ours, authors') per field: {wrong}"


def test_every_method_is_an_authors_run():
  """No config offers a run the scripts do not have, except ViT-S/32's Table B.2 ablation."""
  runs = {(m.__name__.split(".")[-1], a) for m, a, _, _ in RUNS}
  for module in (vit_s32_imagenet, vit_s16_imagenet, resnet50_imagenet, resnet101_imagenet):
    name = module.__name__.split(".")[-1]
    extra = {m for m in module.METHODS if (name, m) not in runs}
    assert extra == (
      {m for m in module.METHODS if m.startswith("obf_")} if module is vit_s32_imagenet else set()
    )
  assert set(cifar_finetune.methods("vit_s32", 10)) == set(FINETUNE["vit_s32"])


def test_parse_reads_flags_as_train_py_does():
  f = parse("--opt sgd --rho 0.6 --bce-loss --scale 0.05 1.0 --rho 6.0 BATCH_SIZE=4096")
  assert f == {"opt": "sgd", "rho": "6.0", "bce-loss": True, "scale": "0.05", "BATCH_SIZE": "4096"}
