"""Config validation: every bad field fails before anything compiles, naming the field."""

import jax
import pytest

from conftest import tiny_config
from igpt_jax import config_lib

BAD = [
    ({"model.width": 66}, 4, "model.width=66.*divisible by model.num_heads=4"),
    ({"batch_size": 6, "mesh.data": 4}, 4, "batch_size=6.*data-parallel size"),
    ({"objective": "autoregressive"}, 1, "objective='autoregressive'"),
    ({"image_size": 0}, 1, "image_size=0"),
    ({"palette_size": 1}, 1, "palette_size=1"),
    ({"palette_fit_pixels": 10}, 1, "palette_fit_pixels=10"),
    ({"model.num_layers": 0}, 1, "model.num_layers=0.*positive integer"),
    ({"model.dtype": "float16"}, 1, "model.dtype='float16'"),
    ({"model.remat_policy": "some"}, 1, "model.remat_policy='some'"),
    ({"model.attention": "flash"}, 1, "model.attention=.flash."),
    ({"model.attention_block": 0}, 1, "model.attention_block=0"),
    ({"peak_tflops_per_device": -1.0}, 1, "peak_tflops_per_device=-1.0"),
    ({"mask_prob": 1.5}, 1, "mask_prob=1.5"),
    ({"holdout_fraction": 1.0}, 1, "holdout_fraction=1.0"),
    ({"learning_rate": -1.0}, 1, "learning_rate=-1.0"),
    ({"warmup_steps": 100, "total_steps": 10}, 1, "warmup_steps=100.*exceeds total_steps"),
    ({"adam_b2": 1.0}, 1, "adam_b2=1.0"),
    ({"grad_clip_norm": -1.0}, 1, "grad_clip_norm=-1.0"),
    ({"train_crop_fraction": (0.9, 0.5)}, 1, "train_crop_fraction"),
    ({"eval_batches": 0}, 1, "eval_batches=0"),
    ({"mesh.tensor": 3}, 4, "mesh=.*does not divide the 4 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 4, "at most one axis may be -1"),
    ({"mesh.tensor": 8, "mesh.data": 1}, 8, "model.num_heads=4.*mesh.tensor=8"),
    ({"mesh.fsdp": 4, "mesh.data": 1, "batch_size": 16, "model.width": 66,
      "model.num_heads": 2}, 4, "model.width=66.*mesh.fsdp=4"),
    ({"dataset": ""}, 1, "dataset=''"),
    ({"sample_temperature": 0.0}, 1, "sample_temperature=0.0"),
    ({"eval.tasks": "linear_probe,knn"}, 1, "eval.tasks='linear_probe,knn'"),
    ({"eval.tasks": ""}, 1, "eval.tasks=''"),
    ({"eval.holdout_fraction": 0.0}, 1, "eval.holdout_fraction=0.0"),
    ({"eval.probe_solver": "adam"}, 1, "eval.probe_solver='adam'"),
    ({"eval.probe_l2": ()}, 1, "eval.probe_l2=.*non-empty"),
    ({"eval.probe_l2": (0.1, -1.0)}, 1, "eval.probe_l2=.*>= 0"),
    ({"eval.low_data_per_class": (4, 0)}, 1, "eval.low_data_per_class"),
    ({"eval.finetune_steps": 0}, 1, "eval.finetune_steps=0"),
    ({"eval.finetune_learning_rate": 0.0}, 1, "eval.finetune_learning_rate=0.0"),
    ({"eval.batch_size": -2}, 1, "eval.batch_size=-2"),
    ({"eval.max_train_examples": 0}, 1, "eval.max_train_examples=0"),
]


@pytest.mark.parametrize("overrides, devices, message", BAD)
def test_bad_config_names_the_field(overrides, devices, message):
  config = tiny_config(**overrides)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, devices)


def test_good_configs_pass():
  config_lib.validate(tiny_config(), 1)
  config_lib.validate(tiny_config(**{"mesh.data": 2, "mesh.tensor": 2}), 4)
  assert config_lib.resolve_mesh_shape(tiny_config().mesh, 8) == (8, 1, 1)
  assert config_lib.resolve_mesh_shape(tiny_config(**{"mesh.fsdp": 2}).mesh, 8) == (4, 2, 1)


@pytest.mark.skipif(jax.devices()[0].platform == "gpu", reason="checks the message off a GPU")
def test_cudnn_attention_off_a_gpu_says_what_to_use():
  config = tiny_config(**{"model.attention": "cudnn", "model.dtype": "bfloat16"})
  with pytest.raises(config_lib.ConfigError, match="model.attention='cudnn'.*needs an NVIDIA GPU"
                     ".*'blockwise'"):
    config_lib.validate(config, 1)


def test_configs_saved_before_the_attention_fields_still_load():
  """A converted run's config.json from before model.attention existed builds the model."""
  from igpt_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  with config.unlocked():
    del config.model["attention"], config.model["attention_block"]
    del config["peak_tflops_per_device"]
  config_lib.validate(config, 1)
  assert model_lib.model_config_from(config).attention == "auto"


def test_in_training_evaluators_are_validated():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from conftest import quickstart_config  # pylint: disable=g-import-not-at-top
  c = quickstart_config()
  c.evals.probe = ml_collections.ConfigDict(dict(every_steps=50, tasks="linear_probe"))
  config_lib.validate(c, 1)
  for bad, message in [
      (dict(every_steps=0), r"evals.probe.every_steps=0: must be a positive"),
      (dict(every_steps=10, task="linear_probe"), r"\['task'\].*not config.eval fields"),
      (dict(every_steps=10, tasks="knn"), r"in config.evals.probe: config.eval.tasks='knn'"),
      # Checked against the model before the first step, not at the first evaluation.
      (dict(every_steps=10, layers="2,9"), r"in config.evals.probe: config.eval.layers='2,9' "
                                           r"must be .* in \[0, 4\]"),
      (dict(every_steps=10, tasks="low_data", layers="2,4", low_data_layer=3),
       r"eval.low_data_layer=3: is not among the extracted layers \[2, 4\]"),
  ]:
    c.evals.probe = ml_collections.ConfigDict(bad)
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.validate(c, 1)


def test_more_devices_than_images_names_the_mesh_that_works():
  """iGPT-L's batch of 128 on a 256-chip slice with the default (data-parallel) mesh: the error
  gives the mesh flags that fit, and they do."""
  from configs import l  # pylint: disable=g-import-not-at-top
  c = l.get_config()
  with pytest.raises(config_lib.ConfigError, match=r"--config.mesh.data=1 --config.mesh.fsdp="
                     r"128 --config.mesh.tensor=2, or raise config.batch_size"):
    config_lib.validate(c, 256)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 128, 2
  config_lib.validate(c, 256)
