r"""iGPT-S on ImageNet with the paper's recipe: configs/imagenet.py:s (kept so that documented
commands keep working).

  python -m igpt_jax.main --config=configs/s.py --workdir=/runs/igpt_s
"""

from igpt_jax import config_lib


def get_config():
  return config_lib.imagenet_config("s")
