r"""iGPT-L on ImageNet with the paper's recipe: configs/imagenet.py:l (kept so that documented
commands keep working).

  python -m igpt_jax.main --config=configs/l.py --workdir=/runs/igpt_l
"""

from igpt_jax import config_lib


def get_config():
  return config_lib.imagenet_config("l")
