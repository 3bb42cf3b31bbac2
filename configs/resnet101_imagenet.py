"""ResNet-101 trained from scratch on ImageNet (paper Table C.1, rows "ResNet-101, IMAGENET TRAIN").

scripts/train_rn101.sh equals train_rn50.sh except for the model, so this config is
configs/resnet50_imagenet.py with model resnet101 (see there for every value) and the five
ResNet-101 runs of the authors' scripts/run_experiments.sh (rn101_*), whose settings are
ResNet-50's.

  python main.py --workdir=... --config=configs/resnet101_imagenet.py:sam_obf
  python main.py --workdir=... --config=configs/resnet101_imagenet.py:sam_obf,local   # offline: tiny model on digits
"""

from configs import resnet50_imagenet

RUNS = ("sgd", "sam_steep", "sam_obf", "gsam_steep", "gsam_obf")  # run_experiments.sh, rn101_*
METHODS = {k: resnet50_imagenet.METHODS[k] for k in RUNS}
ARGS = f"METHOD[,local] with METHOD in {', '.join(METHODS)} (default sam_obf)"


def get_config(arg=None):
  return resnet50_imagenet.get_config(arg, model="resnet101", methods=METHODS)
