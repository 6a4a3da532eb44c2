r"""iGPT-M on ImageNet with the paper's recipe: configs/imagenet.py:m (kept so that documented
commands keep working).

  python -m igpt_jax.main --config=configs/m.py --workdir=/runs/igpt_m
"""

from igpt_jax import config_lib


def get_config():
  return config_lib.imagenet_config("m")
