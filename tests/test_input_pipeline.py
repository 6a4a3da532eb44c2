"""The tf-datasets pipeline on the real CIFAR-10 images (a local `<split>/<label>/<file>` folder)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from igpt_jax import image_folder
from igpt_jax import input_pipeline
from igpt_jax import palette


@pytest.fixture(scope="module")
def source(cifar10_dir, tfds_dir):
  return input_pipeline.open_source(tiny_config(dataset=cifar10_dir, data_dir=tfds_dir))


@pytest.fixture(scope="module")
def centers():
  return np.random.default_rng(0).uniform(-1, 1, size=(64, 3)).astype(np.float32)


def first(it, n):
  return [next(it) for _ in range(n)]


def test_cifar10_folder_becomes_a_tfds_dataset(source):
  assert source.num_classes == 10
  assert source.split_sizes == {"train": 45_000, "validation": 5_000, "test": 10_000}
  assert source.split_specs["validation"] == "train[45000:]"
  assert image_folder.label_names(source.builder)[:3] == ["airplane", "automobile", "bird"]


def test_validation_holdout_is_not_one_class(source, cifar_config):
  it = input_pipeline.eval_iterator(cifar_config(), source,
                                    np.zeros((64, 3), np.float32), "validation",
                                    local_batch=500, num_batches=2)
  labels = np.concatenate([b["label"] for b in it])
  assert len(np.unique(labels)) == 10  # the class folders were shuffled at conversion


def test_train_batches_shapes_dtypes_and_determinism(source, centers, cifar_config):
  config = cifar_config(train_flip=True, train_crop_fraction=(0.8, 1.0))
  make = lambda seed: input_pipeline.train_iterator(config, source, centers, local_batch=8,
                                                    seed=seed)
  a, b, c = first(make(1), 3), first(make(1), 3), first(make(2), 3)
  for batch in a:
    assert batch["tokens"].shape == (8, 256) and batch["tokens"].dtype == np.int32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert batch["tokens"].min() >= 0 and batch["tokens"].max() < 64
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_eval_batches_are_real_images_with_padding_mask(source, cifar_config, cifar10_dir):
  config = cifar_config()
  centers = palette.fit(np.random.default_rng(0).integers(0, 256, (5000, 3)), 64)
  n_batches = input_pipeline.num_eval_batches(source, "test", 384, 1)
  assert n_batches == 27  # ceil(10000 / 384)
  batches = list(input_pipeline.eval_iterator(config, source, centers, "test", local_batch=384))
  assert len(batches) == 27
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == 10_000 and not masks[10_000:].any()
  labels = np.concatenate([b["label"] for b in batches])[:10_000]
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
  # The first eval image is one of the test JPEGs: decode, 2x2 area-downsample and quantize it.
  images = input_pipeline.eval_images(config, source, "test")
  first_image = next(iter(images))["image"].numpy()
  assert first_image.shape == (16, 16, 3) and first_image.dtype == np.uint8
  np.testing.assert_array_equal(batches[0]["tokens"][0],
                                np.asarray(palette.quantize(first_image[None], centers))[0])


def test_area_resize_is_box_average_of_the_jpeg(cifar10_dir):
  path = os.path.join(cifar10_dir, "test", "cat", sorted(os.listdir(
      os.path.join(cifar10_dir, "test", "cat")))[0])
  raw = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
  assert raw.shape == (32, 32, 3)
  out = input_pipeline.preprocess(raw, image_size=16).numpy()
  box = raw.numpy().astype(np.float64).reshape(16, 2, 16, 2, 3).mean((1, 3))
  assert np.abs(out - np.round(box)).max() <= 1


def test_processes_read_disjoint_shards(source, cifar_config):
  config = cifar_config()
  def labels_of(index):
    ds = input_pipeline.eval_images(config, source, "validation", process_index=index,
                                    process_count=2)
    return [int(ex["label"]) for ex in ds.take(10_000).as_numpy_iterator()]
  a, b = labels_of(0), labels_of(1)
  assert len(a) + len(b) == 5_000 and abs(len(a) - len(b)) <= 1


def test_grayscale_and_odd_sized_images(tmp_path, tfds_dir):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for label in ("a", "b"):
      os.makedirs(tmp_path / "imgs" / split / label)
      for i in range(3):
        size = (20 + i, 37) if label == "a" else (48, 48)
        arr = rng.integers(0, 256, size=size, dtype=np.uint8)
        tf.io.write_file(str(tmp_path / "imgs" / split / label / f"{i}.png"),
                         tf.io.encode_png(arr[..., None]))
  config = tiny_config(dataset=str(tmp_path / "imgs"), data_dir=str(tmp_path / "tfds"),
                       image_size=8, holdout_fraction=0.0)
  src = input_pipeline.open_source(config)
  assert src.split_sizes["train"] == 6 and src.num_classes == 2
  images = [ex["image"] for ex in
            input_pipeline.eval_images(config, src, "train").as_numpy_iterator()]
  assert all(im.shape == (8, 8, 3) for im in images)
  assert all(np.array_equal(im[..., 0], im[..., 2]) for im in images)  # gray stays gray


def test_missing_folder_fails_with_the_path():
  with pytest.raises(FileNotFoundError, match="/no/such/folder does not exist"):
    input_pipeline.open_source(tiny_config(dataset="/no/such/folder"))


def test_unknown_tfds_name_fails_clearly(tmp_path):
  with pytest.raises(input_pipeline.DatasetError, match="neither a tfds dataset name"):
    input_pipeline.open_source(tiny_config(dataset="no_such_dataset_xyz",
                                           data_dir=str(tmp_path)))


def test_unprepared_tfds_dataset_does_not_fall_back(tmp_path):
  config = tiny_config(dataset="cifar10", data_dir=str(tmp_path), download=False)
  with pytest.raises(input_pipeline.DatasetError, match="'cifar10' is not prepared") as e:
    input_pipeline.open_source(config)
  assert "local image folder" in str(e.value)


def test_bad_split_name(source, cifar10_dir, tfds_dir):
  config = tiny_config(dataset=cifar10_dir, data_dir=tfds_dir, test_split="validation")
  with pytest.raises(input_pipeline.DatasetError, match="config.test_split='validation'"):
    input_pipeline.open_source(config)


def test_corrupt_image_file_is_named(tmp_path):
  for split in ("train",):
    os.makedirs(tmp_path / "imgs" / split / "x")
    tf.io.write_file(str(tmp_path / "imgs" / split / "x" / "ok.png"),
                     tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)))
    (tmp_path / "imgs" / split / "x" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  config = tiny_config(dataset=str(tmp_path / "imgs"), data_dir=str(tmp_path / "tfds"),
                       test_split="train")
  with pytest.raises(Exception, match="broken.jpg"):
    input_pipeline.open_source(config)


def test_digits_builtin():
  config = tiny_config(dataset="digits", image_size=8)
  src = input_pipeline.open_source(config)
  assert src.split_sizes == {"train": 1350, "validation": 150, "test": 297}
  centers = np.random.default_rng(0).uniform(-1, 1, size=(64, 3)).astype(np.float32)
  batch = next(input_pipeline.train_iterator(config, src, centers, local_batch=4, seed=0))
  assert batch["tokens"].shape == (4, 64)
