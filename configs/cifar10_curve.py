r"""The paper's Figure 3 in miniature: probe accuracy against validation bits/dim while a small
next-pixel iGPT pre-trains on CIFAR-10, from one run on a 2-core CPU in under 90 minutes.

4 layers, width 128, 4 heads at 16x16 (256 tokens), the 512-color palette, one cosine schedule
over 3,000 steps. Every 1,000 steps the in-training evaluator `cifar10` fits linear probes at
every layer and on layers concatenated (the paper's best probe: the 4 layers centred on the best
single one) on 5,000 training images (L2 chosen on the held-out 10% of the train split, reported
on the 10,000 test images), beside the raw-pixel baseline on the same splits; the validation
bits/dim is computed on the same held-out images at the same steps:

  python -m igpt_jax.main --config=configs/cifar10_curve.py --workdir=/tmp/igpt_curve \
      --config.dataset=/path/to/cifar10   # a local folder without internet (tfds name: cifar10)
  python bench/probe_curve.py /tmp/igpt_curve   # the table, and the plot against bits/dim
"""

import ml_collections

from igpt_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "cifar10"
  c.image_size = 16
  config_lib.igpt_size(c, num_layers=4, width=128, num_heads=4)
  c.batch_size = 32
  c.total_steps = 3_000
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.log_every_steps = 50
  # Validation bits/dim at the evaluator's steps only: each pass over the 5,000 held-out
  # images costs about a minute here, an evaluator about five.
  c.eval_every_steps = 1_000
  c.eval_batches = -1  # the whole held-out split (5,000 images)
  c.checkpoint_every_steps = 250
  c.num_samples = 8
  c.evals.cifar10 = ml_collections.ConfigDict(dict(
      every_steps=1_000, tasks="linear_probe", layers="all", concat_layers="best:4",
      max_train_examples=5_000, raw_pixel_baseline=True, batch_size=256))
  return c
