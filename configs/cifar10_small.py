r"""A small next-pixel iGPT on CIFAR-10 that trains on a laptop CPU.

8 layers, width 256, 8 heads at 32x32 (1024 tokens), the paper's 512-color palette.
`dataset` is the tfds name; without internet, point it at a local folder of the
`<split>/<label>/<image>` layout (e.g. the extracted CIFAR-10 JPEGs):

  python -m igpt_jax.main --config=configs/cifar10_small.py --workdir=/tmp/igpt_c10 \
      --config.dataset=/path/to/cifar10
"""

from igpt_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "cifar10"
  config_lib.igpt_size(c, num_layers=8, width=256, num_heads=8)
  c.batch_size = 16
  c.total_steps = 20_000
  c.learning_rate = 1e-3
  c.warmup_steps = 500
  c.log_every_steps = 50
  c.eval_every_steps = 1_000
  c.checkpoint_every_steps = 1_000
  c.num_samples = 4
  return c
