r"""iGPT-L (48 layers, width 1536, 16 heads; 1.36B parameters) on ImageNet at 32x32.

The learning rate is our starting point for a sweep; the paper swept it per size.

  python -m igpt_jax.main --config=configs/l.py --workdir=/tmp/igpt_l
"""

from igpt_jax import config_lib


def get_config():
  c = config_lib.imagenet_config()
  config_lib.igpt_size(c, num_layers=48, width=1536, num_heads=16)
  c.learning_rate = 1e-3
  c.model.remat_policy = "dots_saveable"
  return c
