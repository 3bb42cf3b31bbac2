"""Finetuning an ImageNet model on CIFAR-10/100 (paper Table C.1, rows "CIFAR FINETUNE"; Table 2).

Arg "model,dataset,method[,local]": model in {vit_s32, resnet50}, dataset in {cifar10, cifar100},
method in {none, sam_steep, sam_obf}. The ImageNet run to start from must be given:

  python main.py --workdir=... --config=configs/cifar_finetune.py:vit_s32,cifar10,sam_obf \
      --config.init_from=/path/to/imagenet/workdir
  python main.py --workdir=... --config=configs/cifar_finetune.py:resnet50,cifar100,sam_obf,local

`init_from` is left None here. The local variant trains its tiny model from scratch on digits
(offline) unless given an init_from of the same tiny model. The
ImageNet run should use the same model (configs/vit_s32_imagenet.py, configs/resnet50_imagenet.py);
its head is replaced by a new C-way head (bias init 0).

Every value is the authors' run (BorealisAI/perturbed-forgetting: scripts/finetune_vits32_cifar.sh,
scripts/finetune_rn50_cifar.sh and the vits32c*/rn50c* lines of scripts/run_experiments.sh, with
train.py's defaults for flags they do not pass); where our copy of Table C.1 is unreadable or
says otherwise, the scripts govern (docs/fidelity.md). Methods: "none" is plain SGD (the scripts'
max2sgd / obf2sgd runs, from a SAM-trained ImageNet model), "sam_steep" / "sam_obf" SAM with
steepest ascent / OBF (adamw2max, adamw2obf, sgd2max, sgd2obf, from the vanilla ImageNet model).
Augmentation: the authors' train.py (Inception crop, minimum area 0.05, flip) at 224x224, as the
paper's "same pre-processing scheme as we do for training".
"""

from configs import common

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}  # "C" in Table C.1's lambda = 1/C


def methods(model: str, num_classes: int) -> dict:
  """The scripts' finetuning runs for `model`: rho constant (no --rho-policy), --obf-C = C."""
  #   PERTURB        rho     OBF lambda, gamma (--obf-gamma 1e-12 for both models)
  rho = MODELS[model]["rho"]
  # ResNet-50's SAM runs pass --bce-loss (Table C.1 reads CE for every ResNet finetuning row:
  # the scripts govern); its plain-SGD runs keep CE.
  sam_loss = {"loss": "sigmoid_xent"}
  return {
    "none": common.sam_row("none", 0.0),
    "sam_steep": {**common.sam_row("steepest", rho), **sam_loss},
    "sam_obf": {
      **common.sam_row("obf", rho, obf_lambda=1 / num_classes, obf_gamma=1e-12),
      **sam_loss,
    },
  }


# Per model: loss of the plain run, lr (--lr), rho (--rho), and the local variant's tiny model.
MODELS = {
  "vit_s32": dict(loss="sigmoid_xent", lr=0.003, rho=0.05, local_model="vit_ti4"),  # --bce-loss
  "resnet50": dict(loss="softmax_xent", lr=0.01, rho=0.1, local_model="resnet_tiny"),  # CE
}


ARGS = (
  f"MODEL,DATASET,METHOD[,local] with MODEL in {', '.join(MODELS)}, DATASET in "
  f"{', '.join(NUM_CLASSES)}, METHOD in {', '.join(methods('vit_s32', 10))} "
  "(default vit_s32,cifar10,sam_obf)"
)


def _parse(arg):
  parts = [p for p in (arg or "vit_s32,cifar10,sam_obf").split(",") if p]
  local = "local" in parts
  rest = [p for p in parts if p != "local"]
  if len(rest) != 3:
    raise ValueError(f"expected {ARGS}, got {arg!r}")
  return (*rest, local)


def get_config(arg=None):
  model, dataset, method, local = _parse(arg)
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; this config has {sorted(MODELS)}")
  if dataset not in NUM_CLASSES:
    raise ValueError(f"unknown dataset {dataset!r}; this config has {sorted(NUM_CLASSES)}")
  c = common.base_config()
  c.dataset = dataset
  c.eval_datasets = (dataset,)
  c.image_size = 224
  c.model = model
  c.loss = MODELS[model]["loss"]
  c.head_bias_init = 0.0
  c.global_batch_size = 512  # BATCH_SIZE=512
  c.num_epochs = 100.0
  c.warmup_epochs = 5.0
  c.optimizer = "sgdw"  # --opt sgd / sam_sgd, momentum 0.9; weight decay 0, so SGD = SGDW
  c.momentum = 0.9
  c.lr_max = MODELS[model]["lr"]  # Table C.1's cell is unreadable
  c.lr_min = 0.0
  c.weight_decay = 0.0
  c.clip_grad_norm = 1.0
  c.sam.m = 64  # SHARPNESS_M=64
  common.authors_pipeline(c)
  c.init_from = None  # set with --config.init_from=/path/to/imagenet/workdir
  c.log_every_steps = 50
  c.eval_every_steps = 980  # ~10 epochs of 512 on CIFAR's 50k
  c.checkpoint_every_steps = 980
  common.set_method(c, method, methods(model, NUM_CLASSES[dataset]))
  if local:
    common.make_local(c, MODELS[model]["local_model"], image_size=32)
  return c
