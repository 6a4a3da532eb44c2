r"""iGPT-XL on ImageNet with the paper's recipe: configs/imagenet.py:xl (kept so that documented
commands keep working).

  python -m igpt_jax.main --config=configs/xl.py --workdir=/runs/igpt_xl
"""

from igpt_jax import config_lib


def get_config():
  return config_lib.imagenet_config("xl")
