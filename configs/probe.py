r"""Evaluation of a pre-trained model on the paper's probe datasets.

`--config=configs/probe.py:MODEL,DATASET`: MODEL is the pre-training config in this folder
(s, m, l, xl, cifar10_small, quickstart, ...), DATASET one of cifar10, cifar100, stl10,
imagenet2012 (tfds names; their usual train/test splits are used, images resized to the model's
resolution) or a local `<split>/<label>/<image>` folder.

  python -m igpt_jax.evaluate --config=configs/probe.py:l,cifar10 --workdir=/runs/igpt_l
  python -m igpt_jax.evaluate --config=configs/probe.py:s,stl10 --workdir=/runs/igpt_s \
      --config.eval.tasks=linear_probe,low_data
  python -m igpt_jax.evaluate --config=configs/probe.py:s,imagenet2012 --workdir=/runs/igpt_s

ImageNet probes use minibatch SGD (the paper's choice; 1.2M features do not suit one full-batch
L-BFGS solve) and the layers around the middle; CIFAR/STL use full-batch L-BFGS.
"""

import importlib
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # config_flags runs this file by path; `configs` is a package there
  sys.path.insert(0, _ROOT)


def get_config(arg: str = "s,cifar10"):
  model, _, dataset = arg.partition(",")
  if not dataset:
    raise ValueError(f"configs/probe.py:{arg}: give MODEL,DATASET, e.g. configs/probe.py:s,cifar10")
  if not os.path.exists(os.path.join(_ROOT, "configs", f"{model}.py")):
    raise ValueError(f"configs/probe.py:{arg}: no pre-training config configs/{model}.py")
  c = importlib.import_module(f"configs.{model}").get_config()
  c.eval.dataset = dataset
  if dataset == "imagenet2012":
    c.eval.probe_solver = "sgd"
    c.eval.holdout_fraction = 0.04
    c.eval.probe_l2 = (0.0, 1e-5, 1e-4)
  return c
