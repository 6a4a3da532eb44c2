r"""iGPT-XL (60 layers, width 3072; 6.8B parameters) on ImageNet at 64x64 (4096 tokens).

The paper trained XL with batch 64 for 2M steps. The head count (24, head_dim 128) and the
learning rate are our choices; the reference gives neither.

  python -m igpt_jax.main --config=configs/xl.py --workdir=/tmp/igpt_xl
"""

from igpt_jax import config_lib


def get_config():
  c = config_lib.imagenet_config()
  config_lib.igpt_size(c, num_layers=60, width=3072, num_heads=24)
  c.image_size = 64
  c.batch_size = 64
  c.total_steps = 2_000_000
  c.learning_rate = 5e-4
  c.model.remat_policy = "full"
  return c
