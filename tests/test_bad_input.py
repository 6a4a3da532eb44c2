"""Bad input through the real command-line tools: each mistake exits with status 2 and one
message that names the input and the fix, prints no traceback, and changes no file of an
existing run. Plus the inputs that used to be accepted and give wrong results."""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import metrics_by_step
from conftest import quickstart_config
from conftest import run_tool
from igpt_jax import checkpointing
from igpt_jax import errors
from igpt_jax import image_folder
from igpt_jax import input_pipeline
from igpt_jax import decoding
from igpt_jax import train
from igpt_jax import metric_writer

QUICKSTART = "--config=configs/quickstart.py"


def snapshot(root) -> dict:
  """{relative path: sha1} of every file under root (but the writer lock, which names the
  latest process to hold it)."""
  out = {}
  for base, _, files in os.walk(root):
    for name in files:
      if name == checkpointing.LOCK_FILE:
        continue
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def run(trained_quickstart, tmp_path_factory):
  """A copy of the trained quickstart run (so that no test can damage the shared one)."""
  path = str(tmp_path_factory.mktemp("bad_input") / "run")
  shutil.copytree(trained_quickstart, path)
  return path


def write_image(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def tiny_folder(root, classes=("a", "b"), per_class=3, size=8):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for label in classes:
      for i in range(per_class):
        write_image(os.path.join(root, split, label, f"{i}.png"),
                    rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
  return str(root)


cli = run_tool


def assert_user_error(out, *phrases):
  text = out.stdout + out.stderr
  assert out.returncode == 2, (out.returncode, text[-3000:])
  assert "Traceback" not in text, text[-3000:]
  error_lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1, out.stderr[-3000:]
  for phrase in phrases:
    assert phrase in error_lines[0], (phrase, error_lines[0])


# --- main ---------------------------------------------------------------------------------

def bad_config_file(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("def get_config(:\n")
  return str(path)


@pytest.mark.parametrize("case", [
    "unknown field", "unknown nested field", "missing config file", "config does not parse",
    "bad override value", "model changed", "dataset changed", "clipping turned off",
    "truncated config.json",
    "palette wrong shape", "palette pickled objects", "palette changed",
])
def test_main_on_an_existing_run(run, tmp_path, case):
  """Each mistake against a trained run is refused before anything is written to it."""
  workdir = run
  args = [QUICKSTART, f"--workdir={workdir}", "--config.total_steps=130",
          "--config.num_samples=0"]
  expect = []
  restore = None
  if case == "unknown field":
    args.append("--config.modle.width=3")
    expect = ["'modle'", "did you mean 'model'?"]
  elif case == "unknown nested field":
    args.append("--config.model.widht=3")
    expect = ["'widht'", "did you mean 'width'?"]
  elif case == "missing config file":
    args[0] = "--config=configs/no_such_config.py"
    expect = ["configs/no_such_config.py does not exist", "--config="]
  elif case == "config does not parse":
    args[0] = f"--config={bad_config_file(tmp_path)}"
    expect = ["bad.py does not parse", "line 1"]
  elif case == "bad override value":
    args.append("--config.batch_size=abc")
    expect = ["--config.batch_size=abc", "invalid literal"]
  elif case == "model changed":
    args.append("--config.model.width=64")
    expect = ["model.width: saved 128, now 64", "new --workdir"]
  elif case == "dataset changed":
    args.append(f"--config.dataset={tiny_folder(tmp_path / 'other')}")
    expect = ["trained on other data", "dataset: saved 'digits'", "allow_data_change"]
  elif case == "clipping turned off":
    args.append("--config.grad_clip_norm=0")
    expect = ["gradient clipping on", "config.grad_clip_norm: saved 1.0, now 0",
              "to any value > 0"]
  elif case == "truncated config.json":
    path = os.path.join(workdir, "config.json")
    restore = open(path).read()
    with open(path, "w") as f:
      f.write(restore[:40])
    expect = ["config.json is truncated or not JSON", "Restore it from a copy"]
  elif case == "palette wrong shape":
    np.save(tmp_path / "p.npy", np.zeros((3, 3), np.float32))
    args += [f"--config.palette_path={tmp_path / 'p.npy'}", "--config.allow_data_change=True"]
    expect = ["p.npy holds a float32 array of shape (3, 3)", "(16, 3)"]
  elif case == "palette pickled objects":
    np.save(tmp_path / "p.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    args += [f"--config.palette_path={tmp_path / 'p.npy'}", "--config.allow_data_change=True"]
    expect = ["cannot read palette file", "p.npy", "Delete it to refit"]
  elif case == "palette changed":
    np.save(tmp_path / "p.npy", np.zeros((16, 3), np.float32))
    args.append(f"--config.palette_path={tmp_path / 'p.npy'}")
    expect = ["trained on other data", "palette_path: saved ''", "allow_data_change"]
  before = snapshot(workdir)
  try:
    out = cli("main", *args)
    assert_user_error(out, *expect)
    assert snapshot(workdir) == before  # no file of the run was touched
  finally:
    if restore is not None:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(restore)


def test_an_error_inside_get_config_is_its_own_line_not_a_traceback(tmp_path):
  out = cli("main", "--config=configs/imagenet.py:xxl", f"--workdir={tmp_path}")
  assert_user_error(out, "imagenet variant 'xxl': use one of ['l', 'm', 's', 'xl']")
  assert "File \"" not in out.stderr and ").." not in out.stderr


def test_an_evaluator_whose_dataset_is_missing_stops_before_the_first_step(tmp_path):
  config_file = tmp_path / "with_evals.py"
  config_file.write_text(
      "import ml_collections\n"
      "from configs import quickstart\n"
      "def get_config():\n"
      "  c = quickstart.get_config()\n"
      "  c.evals.probe = ml_collections.ConfigDict(dict(every_steps=10, tasks='linear_probe',\n"
      f"      dataset={str(tmp_path / 'no_such_folder')!r}))\n"
      "  return c\n")
  out = cli("main", f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
  assert_user_error(out, "in-training evaluator config.evals.probe: its dataset",
                    "no_such_folder")
  assert "step 1/" not in out.stdout
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_main_workdir_that_is_a_file_or_unwritable(tmp_path):
  a_file = tmp_path / "f"
  a_file.write_text("x")
  assert_user_error(cli("main", QUICKSTART, f"--workdir={a_file}"), "is a file", "directory")
  # /sys is read-only even for root: the check runs before the palette is fitted.
  assert_user_error(cli("main", QUICKSTART, "--workdir=/sys/igpt_jax_test_run"),
                    "/sys/igpt_jax_test_run is not writable", "permissions")


def test_a_diverging_run_stops_in_one_line_and_keeps_its_checkpoint(tmp_path):
  """A learning rate of 1e30 overflows the second step: one line naming the step and the
  settings to change, exit 2, and the first step's checkpoint left as the latest."""
  out = cli("main", QUICKSTART, f"--workdir={tmp_path}", "--config.learning_rate=1e30",
            "--config.warmup_steps=0", "--config.total_steps=4", "--config.log_every_steps=1",
            "--config.checkpoint_every_steps=1", "--config.eval_every_steps=100")
  assert_user_error(out, "DivergedError", "non-finite training step 2", "learning_rate")
  assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_main_fewer_training_pixels_than_colors(tmp_path):
  """Two 8x8 digits are 128 pixels: too few for a 512-color palette. The message gives the
  counts actually used, not the config's."""
  out = cli("main", QUICKSTART, f"--workdir={tmp_path / 'run'}", "--config.palette_size=512",
            "--config.palette_fit_images=2")
  assert_user_error(out, "512-color palette needs at least 512 pixels", "got 128",
                    "palette_fit_images")
  assert "on 128 pixels of 2 training images" in out.stdout


def test_what_a_folder_scan_ignores_is_said_in_one_line(tmp_path, capsys):
  root = tiny_folder(tmp_path / "imgs")
  write_image(os.path.join(root, "train", "a", "deeper", "x.png"), np.zeros((8, 8, 3), np.uint8))
  (tmp_path / "imgs" / "train" / "a" / "notes.txt").write_text("not an image")
  os.symlink(tmp_path / "gone.png", tmp_path / "imgs" / "train" / "b" / "dangling.png")
  (tmp_path / "imgs" / "train" / "c").mkdir()
  (tmp_path / "imgs" / "train" / "c" / "readme.md").write_text("no images here")
  splits = image_folder.scan_folder(root)
  assert sorted(splits) == ["test", "train"] and len(splits["train"]) == 6
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("Warning")]
  assert len(lines) == 1, lines
  for phrase in ("2 files that are not images", "1 folders below <split>/<label>/",
                 "1 broken links", "1 label folder(s) with no image (train/c)"):
    assert phrase in lines[0], (phrase, lines[0])


def test_main_corrupt_image_in_a_folder_is_named(tmp_path):
  root = tiny_folder(tmp_path / "imgs")
  (tmp_path / "imgs" / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  (tmp_path / "imgs" / "train" / "b" / "empty.png").write_bytes(b"")
  out = cli("main", QUICKSTART, f"--workdir={tmp_path / 'run'}", f"--config.dataset={root}",
            f"--config.data_dir={tmp_path / 'tfds'}")
  assert_user_error(out, "could not convert image folder", "delete or replace it")
  assert "broken.jpg" in out.stderr or "empty.png" in out.stderr


# --- sample, plan, convert, evaluate --------------------------------------------------------

@pytest.mark.parametrize("flag,phrase", [
    ("--num=0", "--num must be a positive"), ("--num=-3", "--num must be a positive"),
    ("--top_k=-5", "--top_k >= 0"), ("--split=bogus", "--split"),
    ("--temperature=0", "--temperature > 0"), ("--temperature=-1", "--greedy"),
    ("--top_p=0", "0 < --top_p <= 1"), ("--completions=0", "--completions must be a positive"),
    ("--top_k=17", "--top_k=17 is more than the palette's 16 colors"),
    ("--mode=complete --split=validation --config.holdout_fraction=0",
     "--split=validation holds no images"),
])
def test_sample_flags(run, flag, phrase):
  before = snapshot(run)
  assert_user_error(cli("sample", QUICKSTART, f"--workdir={run}", *flag.split()), phrase)
  assert snapshot(run) == before


def test_a_stray_argument_is_a_flag_error(tmp_path):
  out = cli("main", QUICKSTART, f"--workdir={tmp_path}", "stray")
  assert_user_error(out, "unexpected arguments stray", "--name=value")


def test_sampling_config_refuses_what_would_give_wrong_images():
  for kw in ({"temperature": 0.0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -5}):
    with pytest.raises(ValueError, match="must be"):
      decoding.SamplingConfig(**kw)
  decoding.SamplingConfig(temperature=0.5, top_k=10, top_p=0.9)  # fine


@pytest.mark.parametrize("flag,phrase", [("--devices=0", "--devices must be a positive"),
                                         ("--hbm_gib=0", "--hbm_gib must be > 0")])
def test_plan_flags(flag, phrase):
  assert_user_error(cli("plan", QUICKSTART, flag), phrase)


def test_convert_without_a_direction_or_input(run, tmp_path):
  assert_user_error(cli("convert", f"--workdir={tmp_path / 'x'}"), "nothing to do",
                    "--source=hf|openai", "--to=hf")
  assert_user_error(cli("convert", "--source=hf", f"--workdir={tmp_path / 'x'}"),
                    "--source=hf needs --input=PATH")
  assert_user_error(cli("convert", "--to=hf", f"--workdir={tmp_path / 'none'}",
                        f"--output={tmp_path / 'out'}"), "has no config.json")


def test_export_never_writes_into_a_training_run(run, tmp_path):
  """--to=hf into a non-empty directory that is not a previous export (here the run itself)
  is refused; a fresh directory, then the same one again, work."""
  pytest.importorskip("safetensors")
  before = snapshot(run)
  out = cli("convert", "--to=hf", f"--workdir={run}", f"--output={run}")
  assert_user_error(out, "is not empty and is not a previous export", "new or empty directory")
  assert snapshot(run) == before
  target = tmp_path / "export"
  for _ in range(2):  # a previous export may be overwritten
    out = cli("convert", "--to=hf", f"--workdir={run}", f"--output={target}")
    assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(os.listdir(target)) == ["config.json", "model.safetensors",
                                        "preprocessor_config.json"]
  assert snapshot(run) == before
  assert_user_error(cli("convert", "--source=hf", f"--input={target}", "--to=hf",
                        f"--workdir={run}", f"--output={target}"), "two conversions")
  # Importing into a run that has no checkpoints yet is refused too, then allowed with
  # --overwrite, which keeps the old files aside.
  young = tmp_path / "young"
  young.mkdir()
  shutil.copy(os.path.join(run, "config.json"), young)
  shutil.copy(os.path.join(run, "palette.npy"), young)
  before = snapshot(young)
  out = cli("convert", "--source=hf", f"--input={target}", f"--workdir={young}")
  assert_user_error(out, "holds a run (palette.npy, config.json)", "--overwrite")
  assert snapshot(young) == before
  out = cli("convert", "--source=hf", f"--input={target}", f"--workdir={young}", "--overwrite")
  assert out.returncode == 0, out.stderr[-3000:]
  aside = [d for d in os.listdir(young) if d.startswith("replaced.")]
  assert len(aside) == 1 and snapshot(young / aside[0]) == before
  assert os.path.exists(young / "checkpoints" / "0")


@pytest.fixture(scope="module")
def hf_export(trained_quickstart, tmp_path_factory):
  """The trained quickstart exported for transformers (a valid import source to break)."""
  pytest.importorskip("safetensors")
  out = tmp_path_factory.mktemp("hf") / "export"
  done = cli("convert", "--to=hf", f"--workdir={trained_quickstart}", f"--output={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  return out


def _broken_copy(src, dst, break_it):
  shutil.copytree(src, dst)
  break_it(dst)
  return str(dst)


def _edit_json(path, **changes):
  with open(path) as f:
    data = json.load(f)
  data.update(changes)
  for k, v in list(data.items()):
    if v is None:
      del data[k]
  with open(path, "w") as f:
    json.dump(data, f)


@pytest.mark.parametrize("case, break_it, phrase", [
    ("another architecture", lambda d: _edit_json(d / "config.json", model_type="gpt2"),
     "describes a 'gpt2' model"),
    ("no n_layer", lambda d: _edit_json(d / "config.json", n_layer=None), "n_layer=None"),
    ("heads do not divide the width",
     lambda d: _edit_json(d / "config.json", n_head=3), "does not divide n_embd"),
    ("fewer layers in the weights than the config says",
     lambda d: _edit_json(d / "config.json", n_layer=9), "the weights have no tensor"),
    ("corrupt safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
     "cannot be read as safetensors"),
    ("ragged palette", lambda d: _edit_json(d / "preprocessor_config.json",
                                            clusters=[[0.1, 0.2, 0.3], [0.1]]),
     "not a rectangular array"),
    ("palette of the wrong size", lambda d: _edit_json(d / "preprocessor_config.json",
                                                       clusters=[[0.1, 0.2, 0.3]] * 3),
     "not (16, 3)"),
])
def test_import_of_a_broken_transformers_model_says_what_is_wrong(hf_export, tmp_path, case,
                                                                   break_it, phrase):
  from igpt_jax import weights  # pylint: disable=g-import-not-at-top
  source = _broken_copy(hf_export, tmp_path / "broken", break_it)
  with pytest.raises(weights.ConversionError, match=re.escape(phrase)):
    weights.import_hf(source, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_import_and_export_file_errors_are_one_line(hf_export, run, tmp_path):
  source = _broken_copy(hf_export, tmp_path / "broken",
                        lambda d: (d / "model.safetensors").write_bytes(b"not safetensors"))
  assert_user_error(cli("convert", "--source=hf", f"--input={source}",
                        f"--workdir={tmp_path / 'out'}"), "cannot be read as safetensors")
  # /sys is read-only even for root.
  assert_user_error(cli("convert", "--to=hf", f"--workdir={run}",
                        "--output=/sys/igpt_jax_export"), "is not writable")
  np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object))
  from igpt_jax import weights  # pylint: disable=g-import-not-at-top
  with pytest.raises(weights.ConversionError, match="not a plain .npy array"):
    weights.checked_palette_file(str(tmp_path / "pickled.npy"), 16)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    weights.checked_palette_file(str(tmp_path / "missing.npy"), 16)


def test_probe_on_a_one_class_dataset_is_refused(run, tmp_path):
  root = tiny_folder(tmp_path / "one", classes=("only",), per_class=6)
  before = snapshot(run)
  out = cli("evaluate", QUICKSTART, f"--workdir={run}", f"--config.eval.dataset={root}",
            f"--config.data_dir={tmp_path / 'tfds'}", "--config.eval.tasks=linear_probe")
  assert_user_error(out, "has 1 class", "at least 2", "bits_per_dim")
  assert snapshot(run) == before


# --- accepted before, and wrong ----------------------------------------------------------------

def test_an_archive_given_as_the_dataset_says_to_extract_it(tmp_path):
  archive = tmp_path / "cifar10_jpeg.tar.gz"
  archive.write_bytes(b"\x1f\x8b")
  with pytest.raises(errors.MissingError, match="is an archive, not a folder: extract it"):
    image_folder.scan_folder(str(archive))
  notes = tmp_path / "notes.txt"
  notes.write_text("x")
  with pytest.raises(errors.MissingError, match="is a file, not a folder"):
    image_folder.scan_folder(str(notes))


def test_a_data_dir_that_is_a_file_or_read_only_names_config_data_dir(tmp_path):
  folder = tiny_folder(tmp_path / "images")
  a_file = tmp_path / "data_dir_file"
  a_file.write_text("x")
  with pytest.raises(input_pipeline.DatasetError, match="config.data_dir=.* is a file"):
    input_pipeline.open_source(quickstart_config(dataset=folder, data_dir=str(a_file)))
  # /sys is read-only even for root: the converted copy cannot be written there.
  with pytest.raises(input_pipeline.DatasetError,
                     match="cannot write the converted copy.*set config.data_dir"):
    input_pipeline.open_source(quickstart_config(dataset=folder,
                                                 data_dir="/sys/igpt_jax_data"))


def test_no_validation_split_is_said_not_logged_as_zero(tmp_path, capsys):
  workdir = str(tmp_path)
  config = quickstart_config(total_steps=4, eval_every_steps=2, checkpoint_every_steps=4,
                             log_every_steps=2, warmup_steps=1, holdout_fraction=0.0)
  _, result = train.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  assert "No validation split (holdout_fraction=0.0)" in out
  assert "val bits/dim" not in out and "val_loss" not in result
  assert all("val_bits_per_dim" not in row for row in metrics_by_step(workdir).values())


def test_a_tiny_training_split_is_warned_about(tmp_path, capsys):
  config = quickstart_config(total_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                             log_every_steps=1, warmup_steps=1, holdout_fraction=0.99)
  train.train_and_evaluate(config, str(tmp_path))
  assert ("Warning: the training split has 15 images, fewer than one batch (64)"
          in capsys.readouterr().out)


def test_a_changed_image_folder_is_converted_again(tmp_path):
  root = tiny_folder(tmp_path / "imgs", classes=("a", "b", "c"))
  config = quickstart_config(dataset=root, data_dir=str(tmp_path / "tfds"), image_size=8,
                             holdout_fraction=0.0)
  first = input_pipeline.open_source(config)
  assert first.num_classes == 3 and first.split_sizes["train"] == 9
  shutil.rmtree(tmp_path / "imgs" / "train" / "c")
  shutil.rmtree(tmp_path / "imgs" / "test" / "c")
  second = input_pipeline.open_source(config)
  assert second.num_classes == 2 and second.split_sizes["train"] == 6
  (tmp_path / "imgs" / "train" / "a" / "new.jpg").write_bytes(b"\xff\xd8 corrupt")
  with pytest.raises(input_pipeline.DatasetError, match="new.jpg"):
    input_pipeline.open_source(config)
  os.remove(tmp_path / "imgs" / "train" / "a" / "new.jpg")  # back to the second content:
  third = input_pipeline.open_source(config)  # its conversion is reused, not redone
  assert third.num_classes == 2 and third.split_sizes["train"] == 6
  builder = image_folder.LocalImageFolder(root, data_dir=str(tmp_path / "tfds"))
  assert builder.is_prepared()
  assert len(os.listdir(tmp_path / "tfds" / "igpt_image_folders")) == 3  # 2 done, 1 failed


def test_resuming_after_a_fallback_keeps_one_metrics_row_per_step(run, tmp_path):
  """Rows logged after the checkpoint a resume starts from are dropped, then logged anew."""
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "120"))  # the resume falls back to 60
  assert 120 in [row["step"] for row in metric_writer.rows(workdir)]
  config = quickstart_config(total_steps=64, log_every_steps=2)
  train.train_and_evaluate(config, workdir)
  steps = [row["step"] for row in metric_writer.rows(workdir)]
  assert len(steps) == len(set(steps)) and max(steps) == 64  # the row of step 120 is gone
  assert [s for s in steps if s > 60] == [62, 64]
