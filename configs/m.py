r"""iGPT-M (36 layers, width 1024, 8 heads; 455M parameters) on ImageNet at 32x32.

The learning rate is our starting point for a sweep; the paper swept it per size.

  python -m igpt_jax.main --config=configs/m.py --workdir=/tmp/igpt_m
"""

from igpt_jax import config_lib


def get_config():
  c = config_lib.imagenet_config()
  config_lib.igpt_size(c, num_layers=36, width=1024, num_heads=8)
  c.learning_rate = 1e-3
  return c
