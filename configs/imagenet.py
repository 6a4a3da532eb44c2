r"""iGPT on ImageNet with the paper's recipe, one size per variant: s, m, l or xl.

  python -m igpt_jax.main --config=configs/imagenet.py:l --workdir=/runs/igpt_l

The sizes (igpt_jax/config_lib.py IMAGENET_VARIANTS): S 24 layers x 512 (76.6M parameters),
M 36 x 1024 (455M), L 48 x 1536 (1.36B), XL 60 x 3072 at 64x64 (6.8B). The recipe: batch 128
for 1M steps (XL: 64 for 2M), Adam (0.9, 0.95), one-epoch warmup then cosine decay to 0, no
weight decay, no dropout, no gradient clipping, 4% of ImageNet train held out; random crops of
58-88% of the short side, area-downsampled. S uses the paper's lr 0.003; M, L and XL start a
sweep (the paper swept per size). configs/s.py, m.py, l.py and xl.py are the same configs.
"""

from igpt_jax import config_lib


def get_config(variant: str = "s"):
  return config_lib.imagenet_config(variant)
