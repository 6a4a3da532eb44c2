"""The train state and how it is built: model, learning-rate schedule and optimizer of a config,
the sharded state built shape-first (abstractly for planning and restoring, or allocated fresh).

Training (`train.py`), the memory planner and weight import build states through this module;
tools that read parameters only (evaluate, sample, export) use `run.Run` and never build one.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import checkpointing
from igpt_jax import model as model_lib
from igpt_jax import optim
from igpt_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def warmup_steps(config, train_examples: int | None = None) -> int:
  """config.warmup_steps, with -1 meaning one epoch of the training split (the paper).

  Tools that do not open the data (plan, convert) pass no split size: for them the schedule
  changes neither shapes nor memory, and -1 stands for no warmup.
  """
  if config.warmup_steps >= 0:
    return config.warmup_steps
  if train_examples is None:
    return 0
  return min(config.total_steps, max(1, train_examples // config.batch_size))


def lr_schedule(config, warmup: int):
  """Linear warmup from 0 to config.learning_rate, then cosine decay to 0 at total_steps."""
  return optim.warmup_cosine(*lr_args(config, warmup))


def lr_args(config, warmup: int, mesh=None):
  """The schedule's numbers as the train step takes them: float32 [peak learning rate, warmup
  steps, total steps], an input of the compiled step rather than constants in it (a run
  extended to more steps, or another run of the same shapes, reuses the compiled step and the
  compilation cache). With a mesh: a replicated array on its devices, made once before the
  loop (every process passes the same numbers)."""
  values = np.array([config.learning_rate, warmup, config.total_steps], np.float32)
  if mesh is None:
    return values
  return jax.make_array_from_callback(values.shape, sharding.replicated(mesh),
                                      lambda index: values[index])


def model_and_optimizer(config, warmup: int):
  """(model, learning-rate schedule, optimizer) of `config`, warming up over `warmup` steps."""
  model = model_lib.IGPT(model_lib.model_config_from(config))
  schedule = lr_schedule(config, warmup)
  return model, schedule, make_optimizer(config, schedule)


make_optimizer = optim.adam


def _state_init_fn(model, tx, config):
  """rng -> a fresh TrainState whose parameters are boxed with their logical axis names."""
  seq_len = config.image_size**2

  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


KEY_SHAPE = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a jax.random.PRNGKey, as a shape


def sharded_shapes(boxed_shapes, mesh, config):
  """(ShapeDtypeStructs carrying their shardings, the shardings) of the pytree of boxed shapes
  (logical axis names) that `boxed_shapes()` returns, laid out by the config's axis rules on
  `mesh`. Nothing is allocated."""
  with sharding.use(mesh, config):
    boxed = boxed_shapes()
    shardings = sharding.param_shardings(boxed, mesh, config)
  # Unboxed outside the mesh context: under it, unboxing would apply sharding constraints.
  return checkpointing.abstract_like(model_lib.unbox_shapes(boxed), shardings), shardings


def abstract_train_state(model, tx, mesh, config):
  """(shape-only TrainState of ShapeDtypeStructs carrying their shardings, the shardings).

  Nothing is allocated: `jax.eval_shape` of the init, shardings from the logical axis rules.
  The key is a shape too: no eager op, so this also works on compile-only devices.
  """
  return sharded_shapes(lambda: jax.eval_shape(_state_init_fn(model, tx, config), KEY_SHAPE),
                        mesh, config)


def create_train_state(model, tx, mesh, config, seed: int):
  """Builds the sharded train state shape-first, so it is never materialised on one device.
  The key is made from `seed` inside the jitted init: nothing is copied from the host.

  Returns (state, state_shardings).
  """
  _, shardings = abstract_train_state(model, tx, mesh, config)
  init = _state_init_fn(model, tx, config)
  with sharding.use(mesh, config):
    state = jax.jit(lambda: nn.meta.unbox(init(jax.random.PRNGKey(seed))),
                    out_shardings=shardings)()
  return state, shardings
