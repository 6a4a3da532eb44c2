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

import importlib.util
import os


def get_config(arg: str = "s,cifar10"):
  model, _, dataset = arg.partition(",")
  if not dataset:
    raise ValueError(f"configs/probe.py:{arg}: give MODEL,DATASET, e.g. configs/probe.py:s,cifar10")
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{model}.py")
  if not os.path.exists(path):
    raise ValueError(f"configs/probe.py:{arg}: no pre-training config {path}")
  spec = importlib.util.spec_from_file_location(f"igpt_config_{model}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.eval.dataset = dataset
  if dataset == "imagenet2012":
    c.eval.probe_solver = "sgd"
    c.eval.holdout_fraction = 0.04
    c.eval.probe_l2 = (0.0, 1e-5, 1e-4)
  return c
