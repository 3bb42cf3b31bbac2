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

Notes on values that are not readable in our copy of Table C.1:
  * lr_max: the extracted rows show only "0 0" for weight decay / learning rate; weight decay 0 and
    lr_min 0 are read from them, lr_max is not recoverable and 0.03 (SGD momentum 0.9, batch 512,
    the usual ViT/BiT CIFAR finetuning value) is used.
  * Augmentation is not given in the paper: the default Inception crop (crop_area_min 0.08) and
    flip at 224x224, as in big_vision's CIFAR finetuning configs.
"""

from configs import common

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}  # "C" in Table C.1's lambda = 1/C


def methods(model: str, num_classes: int) -> dict:
  """Table C.1's CIFAR FINETUNE rows for `model` (rho constant in every row)."""
  if model == "vit_s32":
    #   PERTURB        rho     OBF lambda, gamma
    return {
      "none": common.sam_row("none", 0.0),
      "sam_steep": common.sam_row("steepest", 0.05),
      "sam_obf": common.sam_row("obf", 0.05, obf_lambda=1 / num_classes, obf_gamma=1.0),
    }
  if model == "resnet50":
    return {
      "none": common.sam_row("none", 0.0),
      "sam_steep": common.sam_row("steepest", 0.1),
      "sam_obf": common.sam_row("obf", 0.1, obf_lambda=1 / num_classes, obf_gamma=1e-12),
    }
  raise ValueError(f"unknown model {model!r}; this config has ['resnet50', 'vit_s32']")


# Per model: loss (Table C.1) and the tiny model of the local variant.
MODELS = {
  "vit_s32": dict(loss="sigmoid_xent", local_model="vit_ti4"),  # BCE
  "resnet50": dict(loss="softmax_xent", local_model="resnet_tiny"),  # CE
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
  c.global_batch_size = 512
  c.num_epochs = 100.0
  c.warmup_epochs = 5.0
  c.optimizer = "sgdw"  # Table C.1: SGD, momentum 0.9
  c.momentum = 0.9
  c.lr_max = 0.03  # not readable in Table C.1, see the module docstring
  c.lr_min = 0.0
  c.weight_decay = 0.0
  c.clip_grad_norm = 1.0
  c.sam.m = 64
  c.init_from = None  # set with --config.init_from=/path/to/imagenet/workdir
  c.log_every_steps = 50
  c.eval_every_steps = 980  # ~10 epochs of 512 on CIFAR's 50k
  c.checkpoint_every_steps = 980
  common.set_method(c, method, methods(model, NUM_CLASSES[dataset]))
  if local:
    common.make_local(c, MODELS[model]["local_model"], image_size=32)
  return c
