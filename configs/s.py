r"""iGPT-S (24 layers, width 512, 8 heads; 76.6M parameters) on ImageNet at 32x32, next-pixel.

The paper's recipe: batch 128 for 1M steps, Adam (0.9, 0.95), lr 0.003, one-epoch warmup then
cosine decay to 0, no weight decay, no dropout, 4% of ImageNet train held out.

  python -m igpt_jax.main --config=configs/s.py --workdir=/tmp/igpt_s
"""

from igpt_jax import config_lib


def imagenet_base():
  c = config_lib.base_config()
  c.dataset = "imagenet2012"
  c.test_split = "validation"
  c.holdout_fraction = 0.04
  # Paper: random short side in [256, 384], random 224 crop -> crop side is 58%-88% of the
  # short side, then an area downsample to the model resolution. Eval: centre crop.
  c.train_crop_fraction = (224 / 384, 224 / 256)
  c.cache_data = False
  c.shuffle_buffer = 50_000
  return c


def get_config():
  c = imagenet_base()
  config_lib.igpt_size(c, num_layers=24, width=512, num_heads=8)
  c.learning_rate = 3e-3
  return c
