"""Default: a small ViT with OBF-SAM on scikit-learn's 8x8 digits (no download, CPU minutes).

python main.py --workdir=/tmp/pf
"""

from configs import common


def get_config():
  c = common.base_config()
  c.dataset = "digits"
  c.eval_datasets = ("digits",)
  c.image_size = 8
  c.crop_area_min = 0.5  # 8x8 digits: mild crops only
  c.model = "vit_digits"
  c.loss = "sigmoid_xent"
  c.head_bias_init = -2.3  # ~ log(1/9): sigmoid outputs start near 1/C
  c.global_batch_size = 128
  c.num_epochs = 40.0
  c.warmup_epochs = 2.0
  c.optimizer = "adamw"
  c.lr_max = 3e-3
  c.lr_min = 3e-5
  c.weight_decay = 0.05
  c.clip_grad_norm = 1.0
  c.sam.perturbation = "obf"
  c.sam.rho_max = 0.1
  c.sam.obf_lambda = 1 / 10
  c.sam.obf_gamma = 1.0
  c.sam.m = 32
  c.log_every_steps = 50
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.eval_batch_size = 128
  return c
