"""Faults: kill -9 and exact resume, SIGTERM, damaged checkpoints, non-finite steps."""

import gc
import glob
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import forked

from conftest import REPO
from conftest import metrics_by_step
from conftest import quickstart_config
from conftest import wait_for_logged_steps
from conftest import tool_command
from igpt_jax import checkpointing
from igpt_jax import errors
from igpt_jax import input_pipeline
from igpt_jax import train

CLI = tool_command("main", "--config=configs/quickstart.py", "--config.warmup_steps=2",
                   "--config.num_samples=0", "--config.log_every_steps=1")


def restored_state(workdir, step):
  config = quickstart_config()
  trainer = train.Trainer(config, workdir)
  mgr = checkpointing.manager(workdir, config)
  state = checkpointing.restore(mgr, step, trainer.abstract_state)
  mgr.close()
  return jax.device_get(state)


def test_kill_9_then_resume_is_bit_identical(tmp_path):
  """N steps in one go == k steps, kill -9, restart, finish: same losses, same parameters.
  With 600 training digits and batch 64 an epoch is 9.4 steps: the resumed run crosses the
  epoch boundary."""
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  args = ["--config.total_steps=12", "--config.checkpoint_every_steps=4",
          "--config.eval_every_steps=12", "--config.holdout_fraction=0.5556"]
  ref = forked.popen(CLI + args + [f"--workdir={straight}"], cwd=REPO,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  victim = forked.popen(CLI + args + [f"--workdir={killed}"], cwd=REPO,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not os.path.exists(os.path.join(killed, "checkpoints", "4")):
    assert victim.poll() is None and time.time() < deadline, "no checkpoint 4 appeared"
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  victim.wait(timeout=30)
  assert ref.wait(timeout=300) == 0
  out = forked.run(CLI + args + [f"--workdir={killed}"], cwd=REPO, capture_output=True,
                   text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  resumed_from = int(out.stdout.split("Resumed from checkpoint at step ")[1].split(".")[0])
  assert resumed_from in (4, 8)
  assert f"Data position: example {resumed_from * 64:,} of" in out.stdout
  a, b = metrics_by_step(straight), metrics_by_step(killed)
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for step in range(1, 13):
    assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
    assert a[step]["grad_norm"] == b[step]["grad_norm"]
  sa, sb = restored_state(straight, 12), restored_state(killed, 12)
  for x, y in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb), strict=True):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_exits_42_and_resumes(tmp_path):
  workdir = str(tmp_path)
  args = [f"--workdir={workdir}", "--config.total_steps=100000",
          "--config.checkpoint_every_steps=100000", "--config.eval_every_steps=100000"]
  proc = forked.popen(CLI + args, cwd=REPO, stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL, text=True)
  wait_for_logged_steps(workdir, 3, [proc])
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=60)
  assert proc.returncode == train.PREEMPTED_EXIT_CODE == 42, stdout[-2000:]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(saved) == 1 and saved[0] >= 3
  assert f"checkpoint saved at step {saved[0]}" in stdout
  assert max(metrics_by_step(workdir)) == saved[0]  # the last step was logged, then saved
  out = forked.run(CLI + [f"--workdir={workdir}", f"--config.total_steps={saved[0] + 2}",
                          "--config.eval_every_steps=1000"],
                   cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resumed from checkpoint at step {saved[0]}." in out.stdout


# --- damaged checkpoints (in process) -------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ckpts"))
  train.train_and_evaluate(quickstart_config(total_steps=4, checkpoint_every_steps=2,
                                             eval_every_steps=4), workdir)
  return workdir


def damage(workdir, how):
  d = os.path.join(workdir, "checkpoints", "4", "state")
  if how == "truncated":
    for f in glob.glob(os.path.join(d, "ocdbt.process_0", "d", "*")):
      if os.path.getsize(f) > 100_000:
        with open(f, "r+b") as fh:
          fh.truncate(os.path.getsize(f) // 2)
  elif how == "deleted metadata":
    os.remove(os.path.join(d, "_METADATA"))
  elif how == "deleted data":
    for f in glob.glob(os.path.join(d, "ocdbt.process_0", "d", "*")):
      os.remove(f)


@pytest.mark.parametrize("how", ["truncated", "deleted metadata", "deleted data"])
def test_damaged_latest_checkpoint_is_skipped_and_kept(two_checkpoints, tmp_path, how,
                                                        capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir)
  good = restored_state(workdir, 2)
  damage(workdir, how)
  capsys.readouterr()
  config = quickstart_config(total_steps=6, checkpoint_every_steps=2, eval_every_steps=6)
  state, _ = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "Skipping checkpoint 4: it does not restore" in out
  assert "Resumed from checkpoint at step 2." in out
  moved = glob.glob(os.path.join(workdir, "corrupt_checkpoints", "4-*"))
  assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], "state"))  # kept, not lost
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4, 6]
  assert int(state.step) == 6
  # Step 2 was left untouched and is still restorable.
  for x, y in zip(jax.tree_util.tree_leaves(good),
                  jax.tree_util.tree_leaves(restored_state(workdir, 2))):
    np.testing.assert_array_equal(x, y)


def live_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays())


def test_resume_holds_one_train_state_and_reads_the_saved_data_position(
    two_checkpoints, tmp_path, monkeypatch, capsys):
  """Restoring allocates nothing first (no fresh state beside the restored one), and the
  stream restarts at the position saved in the checkpoint, not at step x batch."""
  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir)
  seen = {}
  real_restore = checkpointing.restore
  def restore(mgr, step, abstract):
    seen["before"] = live_bytes()
    state = real_restore(mgr, step, abstract)
    seen["after"] = live_bytes()
    seen["state"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    return state
  def init_state(self):
    raise AssertionError("a fresh state was built although a checkpoint restores")
  monkeypatch.setattr(checkpointing, "restore", restore)
  monkeypatch.setattr(train.Trainer, "init_state", init_state)
  starts = []
  real_iterator = input_pipeline.train_iterator
  def train_iterator(*args, start_index=0, **kw):
    starts.append(start_index)
    return real_iterator(*args, start_index=start_index, **kw)
  monkeypatch.setattr(input_pipeline, "train_iterator", train_iterator)
  # Move the saved data position of step 4 so that the resume can only have read it.
  mgr = checkpointing.manager(workdir, quickstart_config())
  assert checkpointing.data_position(mgr, 4) == 4 * 64
  mgr.close()
  with open(os.path.join(workdir, "checkpoints", "4", "data", "metadata"), "w") as f:
    f.write('{"next_index": 1000}')
  capsys.readouterr()
  gc.collect()
  baseline = live_bytes()  # arrays other tests left alive in this process
  train.train_and_evaluate(quickstart_config(total_steps=5, checkpoint_every_steps=5,
                                             eval_every_steps=5), workdir)
  assert starts == [1000]
  assert "Data position: example 1,000 of" in capsys.readouterr().out
  assert seen["state"] > 2_000_000  # 0.8M parameters + Adam moments, float32
  # Nothing of the state's size was allocated before the restore, one state after it.
  assert seen["before"] - baseline < 0.05 * seen["state"]
  assert seen["after"] - seen["before"] < 1.05 * seen["state"]


def test_checkpoints_without_a_data_position_resume_from_step_times_batch(
    two_checkpoints, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4", "data"))  # as written before
  capsys.readouterr()
  train.train_and_evaluate(quickstart_config(total_steps=5, checkpoint_every_steps=5,
                                             eval_every_steps=5), workdir)
  assert "Data position: example 256 of" in capsys.readouterr().out


def test_no_restorable_checkpoint_fails_and_moves_nothing(two_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir)
  for step in ("2", "4"):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "_METADATA"))
  config = quickstart_config(total_steps=6, checkpoint_every_steps=2)
  with pytest.raises(checkpointing.CheckpointError, match=r"step 4: .*step 2: .*Nothing was"):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))


def test_interrupted_save_never_becomes_latest(two_checkpoints, tmp_path, capsys):
  """A save killed half way leaves orbax's temporary directory; it is not a checkpoint."""
  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir)
  half = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(workdir, "checkpoints", "4"), half)
  os.remove(os.path.join(half, "state", "_METADATA"))
  capsys.readouterr()
  config = quickstart_config(total_steps=5, checkpoint_every_steps=5, eval_every_steps=5)
  train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "Resumed from checkpoint at step 4." in out and "Skipping" not in out


# --- non-finite steps -----------------------------------------------------------------------

def exploding(**overrides):
  """Adam moves every weight by ~lr on its first step: lr 1e30 overflows step 2's forward."""
  return quickstart_config(learning_rate=1e30, warmup_steps=0, log_every_steps=1,
                           checkpoint_every_steps=1, eval_every_steps=100, total_steps=8,
                           **overrides)


def test_nonfinite_step_stops_before_checkpointing_it(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match="non-finite training step 2 .*last good"):
    train.train_and_evaluate(exploding(), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  state = restored_state(workdir, 1)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))


def test_nonfinite_steps_are_skipped_by_config_then_bounded(tmp_path):
  workdir = str(tmp_path)
  config = exploding(nonfinite_policy="skip", max_nonfinite_skips=3)
  with pytest.raises(FloatingPointError, match="4 non-finite steps skipped .*step 5"):
    train.train_and_evaluate(config, workdir)
  rows = metrics_by_step(workdir)
  assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
  # Steps 2-4 were skipped: the parameters stayed exactly as step 1 made them (finite), and the
  # checkpoints of those steps hold them.
  after_2, after_4 = restored_state(workdir, 2), restored_state(workdir, 4)
  for x, y in zip(jax.tree_util.tree_leaves(after_2.params),
                  jax.tree_util.tree_leaves(after_4.params)):
    np.testing.assert_array_equal(x, y)
    assert np.isfinite(x).all()
  assert int(after_4.step) == 4


# --- bad input ------------------------------------------------------------------------------

def test_odd_image_formats_in_a_local_folder_become_rgb(tmp_path):
  """RGBA, 16-bit grayscale, CMYK, palette and 8-bit grayscale files all read as RGB uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  root = tmp_path / "odd"
  for split in ("train", "test"):
    d = root / split / "a"
    d.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "RGBA").save(d / "a.png")
    Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)).save(d / "b.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "CMYK").save(d / "c.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).convert("P").save(
        d / "d.png")
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8), "L").save(d / "e.jpg")
  config = config_lib.base_config()
  config.dataset, config.data_dir = str(root), str(tmp_path / "tfds")
  config.image_size, config.holdout_fraction = 8, 0.0
  source = input_pipeline.open_source(config)
  images = [ex["image"] for ex in input_pipeline.eval_images(config, source, "test")]
  assert len(images) == 5
  assert all(im.shape == (8, 8, 3) and im.dtype == np.uint8 for im in images)


# --- soak (behind the `slow` marker) ---------------------------------------------------------

@pytest.mark.slow
def test_soak_repeated_kills_and_sigterms_stay_bit_identical(tmp_path):
  """A 60-step run interrupted six times (kill -9 and SIGTERM alternating, at random moments)
  ends bit-identical to the uninterrupted run."""
  args = ["--config.total_steps=60", "--config.checkpoint_every_steps=5",
          "--config.eval_every_steps=60"]
  straight, soaked = str(tmp_path / "straight"), str(tmp_path / "soaked")
  assert forked.run(CLI + args + [f"--workdir={straight}"], cwd=REPO,
                    capture_output=True, timeout=900).returncode == 0
  rng = np.random.default_rng(0)
  for i in range(6):
    proc = forked.popen(CLI + args + [f"--workdir={soaked}"], cwd=REPO,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(float(rng.uniform(8, 25)))
    if proc.poll() is not None:
      break
    proc.send_signal(signal.SIGKILL if i % 2 == 0 else signal.SIGTERM)
    code = proc.wait(timeout=120)
    assert code in (-signal.SIGKILL, train.PREEMPTED_EXIT_CODE), code
  out = forked.run(CLI + args + [f"--workdir={soaked}"], cwd=REPO, capture_output=True,
                   text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  a, b = metrics_by_step(straight), metrics_by_step(soaked)
  assert [a[s]["loss"] for s in range(1, 61)] == [b[s]["loss"] for s in range(1, 61)]
  for x, y in zip(jax.tree_util.tree_leaves(restored_state(straight, 60)),
                  jax.tree_util.tree_leaves(restored_state(soaked, 60))):
    np.testing.assert_array_equal(x, y)


# --- Ctrl-C, one writer per workdir, failed saves ------------------------------------------

def test_ctrl_c_saves_exits_130_resumes_exactly_and_a_second_run_is_refused(tmp_path):
  """SIGINT mid-training: the step finishes, a checkpoint is written at it, exit 130 with one
  line; resuming gives the losses of an uninterrupted run. Meanwhile a second run started on
  the same workdir exits 2 at once, naming the first, and changes none of its files. A third
  run, checkpointing every 2 steps, gets two Ctrl-Cs 0.2 s apart (the second lands in or right
  after the stop's asynchronous save): it stops at once with 130 and one line, and resumes
  from a complete checkpoint to the uninterrupted losses too."""
  straight, victim_dir = str(tmp_path / "straight"), str(tmp_path / "victim")
  twice_dir = str(tmp_path / "twice")
  args = ["--config.total_steps=16", "--config.checkpoint_every_steps=100",
          "--config.eval_every_steps=16"]
  twice_args = ["--config.total_steps=16", "--config.checkpoint_every_steps=2",
                "--config.eval_every_steps=16", f"--workdir={twice_dir}"]
  ref = forked.popen(CLI + args + [f"--workdir={straight}"], cwd=REPO,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  victim = forked.popen(CLI + args + [f"--workdir={victim_dir}"], cwd=REPO,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_logged_steps(victim_dir, 2, [victim])
  second = forked.run(CLI + args + [f"--workdir={victim_dir}"], cwd=REPO,
                      capture_output=True, text=True, timeout=120)
  assert second.returncode == 2, second.stderr[-2000:]
  assert "is in use by another run (pid " in second.stderr
  assert f"pid {victim.pid} " in second.stderr and "Traceback" not in second.stderr
  assert victim.poll() is None  # the first run is untouched
  victim.send_signal(signal.SIGINT)
  stdout, stderr = victim.communicate(timeout=120)
  assert victim.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  saved = [int(s) for s in os.listdir(os.path.join(victim_dir, "checkpoints"))]
  assert len(saved) == 1 and 2 <= saved[0] < 16, saved
  assert f"interrupted (Ctrl-C): checkpoint saved at step {saved[0]}" in stdout
  assert sorted(metrics_by_step(victim_dir)) == list(range(1, saved[0] + 1))
  resumed = forked.popen(CLI + args + [f"--workdir={victim_dir}"], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  twice = forked.popen(CLI + twice_args, cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  wait_for_logged_steps(twice_dir, 3, [twice])
  twice.send_signal(signal.SIGINT)
  time.sleep(0.2)
  if twice.poll() is None:
    twice.send_signal(signal.SIGINT)
  stdout, stderr = twice.communicate(timeout=120)
  assert twice.returncode == 130, stdout[-3000:] + stderr[-3000:]
  assert "Traceback" not in stderr
  assert (stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")
          or "igpt_jax: interrupted (Ctrl-C): checkpoint saved" in stdout)  # 2nd came after
  out = forked.run(CLI + twice_args, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resumed from checkpoint at step " in out.stdout
  stdout, stderr = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, stderr[-3000:]
  assert f"Resumed from checkpoint at step {saved[0]}." in stdout
  assert ref.wait(timeout=300) == 0
  a, b, c = metrics_by_step(straight), metrics_by_step(victim_dir), metrics_by_step(twice_dir)
  assert sorted(a) == sorted(b) == sorted(c) == list(range(1, 17))
  for step in range(1, 17):
    assert a[step]["loss"] == b[step]["loss"] == c[step]["loss"], step


def test_ctrl_c_during_folder_conversion_exits_130_and_leaves_nothing_half_written(
    cifar10_dir, tmp_path):
  """A Ctrl-C while an image folder is converted into a tfds dataset: exit 130 with one line,
  no prepared (or half-prepared) copy left behind, and the next open converts it in full."""
  root, data_dir = tmp_path / "imgs", tmp_path / "tfds"
  for split, per_class in (("train", 2500), ("test", 100)):
    for label in ("airplane", "cat"):
      names = sorted(os.listdir(os.path.join(cifar10_dir, split, label)))[:per_class]
      os.makedirs(root / split / label)
      for name in names:
        shutil.copyfile(os.path.join(cifar10_dir, split, label, name), root / split / label / name)
  proc = forked.popen(CLI + [f"--config.dataset={root}", f"--config.data_dir={data_dir}",
                             f"--workdir={tmp_path / 'run'}"],
                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("Converting image folder"):
      break
  time.sleep(0.5)  # into the conversion (5,200 images: several seconds)
  assert proc.poll() is None, "the conversion ended before the Ctrl-C"
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  assert stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")
  assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(
      tmp_path / "run" / "checkpoints")
  left = [os.path.relpath(os.path.join(d, f), data_dir)
          for d, _, files in os.walk(data_dir) for f in files]
  assert not any(f.endswith("dataset_info.json") for f in left), left
  from igpt_jax import image_folder  # pylint: disable=g-import-not-at-top
  assert not image_folder.LocalImageFolder(str(root), data_dir=str(data_dir)).is_prepared()
  source = input_pipeline.open_source(quickstart_config(dataset=str(root),
                                                        data_dir=str(data_dir)))
  sizes = source.split_sizes
  assert source.num_classes == 2 and sizes["train"] + sizes.get("validation", 0) == 5000


def test_workdir_lock_is_exclusive_and_released(tmp_path):
  with checkpointing.exclusive(str(tmp_path)):
    with pytest.raises(errors.UserError, match=f"in use by another run \\(pid {os.getpid()} "):
      with checkpointing.exclusive(str(tmp_path)):
        pass
  with checkpointing.exclusive(str(tmp_path)):  # released on exit: taken again
    pass


def test_failed_save_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = quickstart_config(total_steps=6, checkpoint_every_steps=2, eval_every_steps=6,
                             log_every_steps=2, warmup_steps=2)
  real_save = checkpointing.save

  def save(mgr, step, state, next_index):
    if step >= 4:
      raise OSError(28, "No space left on device")
    real_save(mgr, step, state, next_index)

  monkeypatch.setattr(checkpointing, "save", save)
  with pytest.raises(checkpointing.CheckpointError,
                     match="saving the checkpoint of step 4 .* failed .*No space left on device"
                           ".*GiB free there.*the checkpoint of step 2 is kept"):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert max(metrics_by_step(workdir)) <= 4  # no step after the failed save was trained


def test_total_steps_below_the_checkpoint_is_refused(trained_quickstart, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_quickstart, workdir)
  with pytest.raises(errors.UserError, match="latest checkpoint is at step 120, past "
                                             "config.total_steps=60"):
    train.train_and_evaluate(quickstart_config(total_steps=60), workdir)
