r"""iGPT-S (24 layers, width 512, 8 heads; 76.6M parameters) on ImageNet at 32x32, next-pixel.

The paper's recipe: batch 128 for 1M steps, Adam (0.9, 0.95), lr 0.003, one-epoch warmup then
cosine decay to 0, no weight decay, no dropout, 4% of ImageNet train held out.

  python -m igpt_jax.main --config=configs/s.py --workdir=/tmp/igpt_s
"""

from igpt_jax import config_lib


def get_config():
  c = config_lib.imagenet_config()
  config_lib.igpt_size(c, num_layers=24, width=512, num_heads=8)
  c.learning_rate = 3e-3
  return c
