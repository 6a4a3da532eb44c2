r"""The paper's Figure 3 in miniature: probe accuracy against validation bits/dim while a small
next-pixel iGPT pre-trains on CIFAR-10, from one run on a CPU.

4 layers, width 128, 4 heads at 16x16 (256 tokens), the 512-color palette; every 250 steps the
in-training evaluator `cifar10` fits linear probes at every layer on 5,000 training images
(validation: the held-out 10% of the train split; test: the 10,000 test images) and the
validation bits/dim is computed on the same held-out images:

  python -m igpt_jax.main --config=configs/cifar10_curve.py --workdir=/tmp/igpt_curve \
      --config.dataset=/path/to/cifar10   # a local folder without internet (tfds name: cifar10)
  python bench/probe_curve.py /tmp/igpt_curve   # the plot: accuracy against bits/dim
"""

import ml_collections

from igpt_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.dataset = "cifar10"
  c.image_size = 16
  config_lib.igpt_size(c, num_layers=4, width=128, num_heads=4)
  c.batch_size = 32
  c.total_steps = 1_500
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 250
  c.eval_batches = -1  # the whole held-out split (5,000 images)
  c.checkpoint_every_steps = 250
  c.num_samples = 8
  c.evals.cifar10 = ml_collections.ConfigDict(dict(
      every_steps=250, tasks="linear_probe", layers="all", max_train_examples=5_000,
      raw_pixel_baseline=False))
  return c
