r"""The CPU reference shape of bench/train_step.py: 8 layers x 256, 8 heads, 32x32, batch 8.

Small enough to step in seconds on a laptop CPU, large enough that the matmuls and the
1024 x 1024 attention dominate as they do at iGPT scale.

  python bench/train_step.py --config=bench/cpu_reference.py
"""

from igpt_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.image_size = 32
  c.palette_size = 512
  config_lib.igpt_size(c, num_layers=8, width=256, num_heads=8)
  c.batch_size = 8
  c.warmup_steps = 100
  c.total_steps = 10_000
  return c
