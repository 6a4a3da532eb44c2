r"""Quickstart: a 4-layer iGPT on scikit-learn's 8x8 handwritten digits, minutes on a CPU.

Needs no download: the 1,797 digits ship inside scikit-learn. 8x8 images (64 tokens), a
16-color palette fitted on the training images, next-pixel prediction.

  python -m igpt_jax.main --config=configs/quickstart.py --workdir=/tmp/igpt_quickstart
"""

from igpt_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "digits"
  c.image_size = 8
  c.palette_size = 16
  c.palette_fit_pixels = 50_000
  config_lib.igpt_size(c, num_layers=4, width=128, num_heads=4)
  c.batch_size = 64
  # 500 steps is ~24 epochs of the 1,350 training digits: validation bits/dim has levelled off
  # (0.619 at step 400, 0.620 at 500 with the grain input; 0.632 -> 0.630 with the earlier
  # tf.data order); at 1,500 steps the model overfits and it rises to ~0.96.
  c.total_steps = 500
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.log_every_steps = 100
  c.eval_every_steps = 100
  c.eval_batches = -1
  c.checkpoint_every_steps = 250
  c.num_samples = 16
  # No fine-tuning augmentation for 8x8 digits: a shift of even one pixel is an eighth of the
  # image (it halved the 90-step fine-tuning accuracy here), and a mirrored digit is another
  # glyph. The default (CIFAR's: 4-pixel padded crop and flip) is for 32x32 photographs.
  c.eval.finetune_pad_crop = 0
  c.eval.finetune_flip = False
  return c
