"""The training loop end to end on real images: learning, checkpoints, resume, the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_tool
from conftest import run_on_fake_devices
from igpt_jax import checkpointing
from igpt_jax import flops
from igpt_jax import metric_writer
from igpt_jax import train


read_metrics = metric_writer.rows


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_next_pixel_loss_goes_down_on_cifar10(cifar_config, tmp_path):
  config = cifar_config(total_steps=60, log_every_steps=10, eval_every_steps=60,
                        eval_batches=4, checkpoint_every_steps=60, warmup_steps=10,
                        peak_tflops_per_device=0.5, **{"model.width": 128, "model.num_heads": 4})
  _, result = train.train_and_evaluate(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  per_token = flops.train_flops_per_token(config.model.num_layers, 128, 4, config.palette_size,
                                          config.image_size**2, causal=True)
  for r in rows:  # throughput accounting: igpt_jax/flops.py over the measured tokens/s
    assert r["model_tflops_per_device"] == pytest.approx(r["tokens_per_sec"] * per_token / 1e12)
    assert r["mfu"] == pytest.approx(r["model_tflops_per_device"] / 0.5)
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  # A zero-initialised head predicts the 64 colors uniformly: ln 64 = 4.16 nats at step 0.
  assert rows[0]["loss"] < np.log(64)
  assert rows[-1]["loss"] < 0.75 * np.log(64), rows
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
  assert result["val_loss"] < 0.8 * np.log(64)
  assert result["val_bits_per_dim"] == pytest.approx(result["val_loss"] / (3 * np.log(2)))
  assert all(r["tokens_per_sec"] > 0 and np.isfinite(r["grad_norm"]) for r in rows)
  palette = np.load(os.path.join(tmp_path, "palette.npy"))
  assert palette.shape == (64, 3) and palette.dtype == np.float32


def test_masked_pixel_objective_trains(cifar_config, tmp_path):
  config = cifar_config(objective="masked_pixel", total_steps=40, log_every_steps=20,
                        eval_every_steps=40, checkpoint_every_steps=40, num_samples=2)
  _, result = train.train_and_evaluate(config, str(tmp_path))
  rows = read_metrics(str(tmp_path))
  assert rows[-1]["loss"] < np.log(64) - 0.3
  assert np.isfinite(result["val_loss"])
  assert os.path.exists(tmp_path / "samples" / "samples_step40.png")


def test_checkpoint_restart_resumes_at_the_right_step(cifar_config, tmp_path):
  workdir = str(tmp_path)
  config = cifar_config(total_steps=4, log_every_steps=1, checkpoint_every_steps=2,
                        eval_every_steps=4, eval_batches=1)
  state, _ = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

  # A restart restores exactly what was saved (params and optimizer state) at the right step.
  trainer = train.Trainer(config, workdir)
  mgr = checkpointing.manager(workdir, config)
  assert mgr.latest_step() == 4
  restored = checkpointing.restore(mgr, 4, trainer.abstract_state)
  assert checkpointing.data_position(mgr, 4) == 4 * config.batch_size
  mgr.close()
  assert int(restored.step) == 4
  assert_trees_equal(restored.params, state.params)
  assert_trees_equal(restored.opt_state, state.opt_state)

  # Asking for more steps continues from 4, not from 0.
  config.total_steps = 6
  state6, _ = train.train_and_evaluate(config, workdir)
  assert int(state6.step) == 6
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "6"]

  # Finished runs stay finished: restarting with the same total trains nothing more.
  state_again, _ = train.train_and_evaluate(config, workdir)
  assert_trees_equal(state_again.params, state6.params)


def test_cli_quickstart_runs_on_builtin_digits(tmp_path):
  """The README's first command, in a cold interpreter as a user starts it."""
  workdir = str(tmp_path / "qs")
  out = run_tool("main", "--config=configs/quickstart.py", f"--workdir={workdir}",
                 "--config.total_steps=30", "--config.warmup_steps=5",
                 "--config.log_every_steps=10", "--config.eval_every_steps=30",
                 "--config.checkpoint_every_steps=30", "--config.num_samples=4", timeout=600,
                 fresh=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "800,000 parameters" in out.stdout
  assert "step 30/30 | loss" in out.stdout and "validation bits/dim" in out.stdout
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [10, 20, 30]
  for key in ("loss", "bits_per_dim", "tokens_per_sec", "val_bits_per_dim"):
    assert key in rows[-1]
  assert os.path.exists(os.path.join(workdir, "samples", "samples_step30.png"))
  # TensorBoard reads the same scalars as metrics.jsonl (written without TensorFlow).
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [
      (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["total_steps"] == 30


def test_cli_rejects_unknown_config_field(tmp_path):
  out = run_tool("main", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
                 "--config.no_such_field=3", timeout=120)
  assert out.returncode != 0 and "no_such_field" in out.stderr


DATA_PARALLEL_SCRIPT = r"""
import json, sys
import jax
from conftest import tiny_config
from igpt_jax import train
losses = {}
for mesh in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
  config = tiny_config(dataset=sys.argv[1], data_dir=sys.argv[2], total_steps=3,
                       log_every_steps=1, eval_every_steps=3, checkpoint_every_steps=3,
                       **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  trainer = train.Trainer(config, sys.argv[3] + "/" + "x".join(map(str, mesh)))
  fresh = trainer.init_state()
  params = fresh.params
  if mesh == (2, 4, 1):  # FSDP shards `embed`; the leading scan axis `layers` is replicated
    spec = params["wte"].sharding.spec
    assert spec == jax.P(None, "fsdp"), spec
    assert params["wte"].addressable_shards[0].data.shape == (64, 16)
  if mesh == (2, 2, 2):
    spec = params["blocks"]["attn"]["query"].sharding.spec
    assert spec == jax.P(None, "fsdp", "tensor", None), spec  # [layers, embed, heads, kv]
    spec = params["blocks"]["mlp"]["fc"]["kernel"].sharding.spec
    assert spec == jax.P(None, "fsdp", "tensor"), spec  # [layers, embed, mlp]
    assert params["blocks"]["mlp"]["fc"]["kernel"].addressable_shards[0].data.shape == (2, 32, 128)
    # Adam's moments are sharded like the parameters.
    mu = fresh.opt_state[1][0].mu["blocks"]["mlp"]["fc"]["kernel"]
    assert mu.sharding.spec == spec, mu.sharding.spec
  del fresh, params
  _, result = train.train_and_evaluate(config, sys.argv[3] + "/" + "x".join(map(str, mesh)))
  rows = [json.loads(l) for l in open(sys.argv[3] + "/" + "x".join(map(str, mesh)) + "/metrics.jsonl")]
  losses["x".join(map(str, mesh))] = [r["loss"] for r in rows]
print("LOSSES", json.dumps(losses))
"""


def test_same_losses_on_one_and_eight_devices(cifar10_dir, tfds_dir, tmp_path, cifar_config):
  """Meshes 8x1x1, 2x4x1 and 2x2x2 (data x fsdp x tensor) on 8 fake CPU devices match 1."""
  config = cifar_config(total_steps=3, log_every_steps=1, eval_every_steps=3,
                        checkpoint_every_steps=3)
  train.train_and_evaluate(config, str(tmp_path / "single"))
  single = [r["loss"] for r in read_metrics(str(tmp_path / "single"))]
  losses = run_on_fake_devices(DATA_PARALLEL_SCRIPT, cifar10_dir, tfds_dir, tmp_path,
                               tag="LOSSES")
  for name, values in losses.items():
    np.testing.assert_allclose(values, single, rtol=1e-5, err_msg=name)


def test_the_train_step_traces_once_over_a_run(tmp_path, monkeypatch):
  """Seven steps with logging, evaluation, checkpoints and a resume in between compile the train
  step once per process start: no step retraces (a changed dtype, shape or static argument).
  The loop (state init or restore, steps, metrics, evaluation, checkpoints) runs under
  `jax.transfer_guard("disallow")` by default (config.transfer_guard): every copy between host
  and devices in it is explicit, and a step handed a host batch fails instead of copying it."""
  from conftest import quickstart_config  # pylint: disable=g-import-not-at-top
  traces = []
  real_step = train.train_step
  def counting_step(state, batch, lr_args, **kw):
    traces.append(batch["tokens"].shape)  # runs only while jax traces the function
    return real_step(state, batch, lr_args, **kw)
  monkeypatch.setattr(train, "train_step", counting_step)
  config = quickstart_config(total_steps=4, log_every_steps=1, eval_every_steps=2,
                             checkpoint_every_steps=2, warmup_steps=1, num_samples=0)
  train.train_and_evaluate(config, str(tmp_path))
  assert traces == [(64, 64)]
  config = quickstart_config(total_steps=7, log_every_steps=1, eval_every_steps=2,
                             checkpoint_every_steps=2, warmup_steps=1, num_samples=0)
  train.train_and_evaluate(config, str(tmp_path))  # resumed at step 4: a new jit, traced once
  assert traces == [(64, 64)] * 2
  # A host (NumPy) batch handed to the jitted step, as a forgotten `global_batch` would.
  def unsharded_step(self, state, batch):
    return self._train_step(state, batch, self.lr_args)  # pylint: disable=protected-access
  monkeypatch.setattr(train.Trainer, "step", unsharded_step)
  config = quickstart_config(total_steps=8, log_every_steps=1, warmup_steps=1, num_samples=0)
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    train.train_and_evaluate(config, str(tmp_path))


def test_runs_of_other_lengths_share_one_compiled_step():
  """The schedule's numbers (peak, warmup, total steps) are an input of the train step, not
  constants in it: configs that differ only in total_steps and warmup_steps lower to the same
  program, so a run extended to more steps (or another run of the same shapes) reuses the
  compiled step and the compilation cache; the learning rate the step reports is the
  schedule's at that step."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from igpt_jax import sharding  # pylint: disable=g-import-not-at-top
  from igpt_jax import train_state  # pylint: disable=g-import-not-at-top
  programs, rates = [], []
  for total, warmup in ((100, 10), (5000, 0)):
    config = tiny_config(total_steps=total, warmup_steps=warmup)
    model, schedule, tx = train_state.model_and_optimizer(config, warmup)
    mesh = sharding.make_mesh(config)
    abstract, shardings = train_state.abstract_train_state(model, tx, mesh, config)
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.int32,
                                               sharding=sharding.batch_sharding(mesh))
    batch = {"tokens": shape(config.batch_size, config.image_size**2),
             "label": shape(config.batch_size)}
    lr = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(mesh))
    step = train.jit_train_step(config, model, mesh, shardings)
    with sharding.use(mesh, config):
      programs.append(step.lower(abstract, batch, lr).as_text())
      state, _ = train_state.create_train_state(model, tx, mesh, config, seed=0)
      state = state.replace(step=jnp.asarray(7, jnp.int32))
      tokens = np.zeros((config.batch_size, config.image_size**2), np.int32)
      _, metrics = step(state, sharding.global_batch(
          {"tokens": tokens, "label": tokens[:, 0]}, mesh), train_state.lr_args(
              config, warmup, mesh))
    rates.append((float(metrics["learning_rate"]), float(schedule(7))))
  assert programs[0] == programs[1]
  for reported, expected in rates:
    assert reported == pytest.approx(expected, rel=1e-6) and reported > 0


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
  """Linear warmup from 0 to the peak at the end of warmup, cosine decay to 0 at total_steps
  (the paper's schedule), as the train step reads it."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from igpt_jax import train_state  # pylint: disable=g-import-not-at-top
  config = tiny_config(learning_rate=3e-3, total_steps=1000)
  lr = train_state.lr_schedule(config, warmup=100)
  at = lambda step: float(lr(step))
  assert at(0) == 0.0
  assert at(50) == pytest.approx(1.5e-3)  # linear: half way up at half the warmup
  assert at(100) == pytest.approx(3e-3)  # the peak, exactly at the end of warmup
  assert max(at(s) for s in range(0, 1001, 10)) == pytest.approx(3e-3)
  assert at(550) == pytest.approx(1.5e-3, rel=1e-3)  # cosine: half the peak half way down
  assert at(1000) == pytest.approx(0.0, abs=1e-12)
  decay = [at(s) for s in range(100, 1001, 50)]
  assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after the peak
  # warmup_steps=-1 means one epoch of the training split (the paper), capped by total_steps.
  config.warmup_steps, config.batch_size = -1, 64
  assert train_state.warmup_steps(config, train_examples=6400) == 100
  assert train_state.warmup_steps(config, train_examples=10**9) == 1000
