"""ResNet-101 trained from scratch on ImageNet (paper Table C.1, rows "ResNet-101, IMAGENET TRAIN").

Table C.1's ResNet-101 rows equal its ResNet-50 rows except for the model, so this config is
configs/resnet50_imagenet.py with model resnet101 (see there for every value). Table B.1 reports
the ASAM and baseline rows for ResNet-50 only; they are offered here with ResNet-50's values.

  python main.py --workdir=... --config=configs/resnet101_imagenet.py:sam_obf
  python main.py --workdir=... --config=configs/resnet101_imagenet.py:sam_obf,local   # offline: tiny model on digits
"""

from configs import resnet50_imagenet

METHODS = resnet50_imagenet.METHODS
ARGS = resnet50_imagenet.ARGS


def get_config(arg=None):
  return resnet50_imagenet.get_config(arg, model="resnet101")
