"""ViT-S/16 trained from scratch on ImageNet (paper Table C.1, rows "ViT-S/16, IMAGENET TRAIN").

Table C.1's ViT-S/16 rows equal its ViT-S/32 rows except for the model, so this config is
configs/vit_s32_imagenet.py with model vit_s16 (see there for every value and the notes on values
our copy of the table does not show). The fixed-alpha ablation (Table B.2) is ViT-S/32 only.

  python main.py --workdir=... --config=configs/vit_s16_imagenet.py:sam_obf
  python main.py --workdir=... --config=configs/vit_s16_imagenet.py:sam_obf,local   # offline: tiny model on digits
"""

from configs import vit_s32_imagenet

METHODS = {k: v for k, v in vit_s32_imagenet.METHODS.items() if not k.startswith("obf_")}
ARGS = f"METHOD[,local] with METHOD in {', '.join(METHODS)} (default sam_obf)"


def get_config(arg=None):
  return vit_s32_imagenet.get_config(arg, model="vit_s16", methods=METHODS)
