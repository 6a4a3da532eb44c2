"""The grain input pipeline on the real CIFAR-10 images (a local `<split>/<label>/<file>` folder)
and the built-in digits: formats, global order with local reads, exact resume, evaluation."""

import os

import numpy as np
import pytest
from PIL import Image

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


class CountingRecords:
  """Records that remember which indices were read."""

  def __init__(self, records):
    self.records, self.read = records, []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.read.append(int(i))
    return self.records[i]

  def __getitems__(self, indices):
    self.read.extend(int(i) for i in indices)
    return self.records.__getitems__(indices)


def test_cifar10_folder_becomes_an_array_record_tfds_dataset(source, cifar10_dir, tfds_dir):
  assert source.num_classes == 10
  assert source.split_sizes == {"train": 45_000, "validation": 5_000, "test": 10_000}
  assert source.label_names[:3] == ["airplane", "automobile", "bird"]
  builder = image_folder.LocalImageFolder(cifar10_dir, data_dir=tfds_dir)
  files = os.listdir(builder.data_dir)
  assert any(".array_record-" in f for f in files), files
  record = source.splits["test"][0]
  assert isinstance(record["image"], bytes) and record["image"][:2] == b"\xff\xd8"  # a JPEG


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


def digits_source(**overrides):
  config = tiny_config(dataset="digits", image_size=8, train_flip=True,
                       train_crop_fraction=(0.6, 1.0), **overrides)
  return config, input_pipeline.open_source(config)


def test_global_batches_do_not_depend_on_the_process_count():
  """Over 2 epochs (1,350 digits, global batch 40: the epoch ends inside batch 33), the local
  slices of 2 and of 4 processes put side by side are the 1-process batches, bit for bit."""
  config, source = digits_source()
  centers = np.random.default_rng(0).uniform(-1, 1, (64, 3)).astype(np.float32)
  def batches(processes, n=70):
    parts = [input_pipeline.train_dataset(config, source, centers, local_batch=40 // processes,
                                          seed=5, process_index=p, process_count=processes)
             for p in range(processes)]
    return [{k: np.concatenate([part[i][k] for part in parts]) for k in ("tokens", "label")}
            for i in range(n)]
  one, two, four = batches(1), batches(2), batches(4)
  for a, b, c in zip(one, two, four):
    for k in ("tokens", "label"):
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], c[k])
  # Each epoch is a permutation of the training split, and the two epochs differ in order.
  labels = np.concatenate([b["label"] for b in one])
  train_labels = np.array([source.splits["train"][i]["label"] for i in range(1350)])
  for epoch in (labels[:1350], labels[1350:2700]):
    np.testing.assert_array_equal(np.bincount(epoch, minlength=10),
                                  np.bincount(train_labels, minlength=10))
  assert not np.array_equal(labels[:1350], labels[1350:2700])


def test_resuming_at_a_stream_position_continues_the_same_batches():
  """A stream restarted at position 33 x 40 (inside the second epoch) on 2 processes gives the
  batches the uninterrupted 1-process stream gave from there."""
  config, source = digits_source()
  centers = np.random.default_rng(0).uniform(-1, 1, (64, 3)).astype(np.float32)
  full = input_pipeline.train_iterator(config, source, centers, local_batch=40, seed=3)
  head = first(full, 40)
  resumed = [input_pipeline.train_iterator(config, source, centers, local_batch=20, seed=3,
                                           start_index=33 * 40, process_index=p,
                                           process_count=2) for p in (0, 1)]
  for want in head[33:]:
    got = [next(it) for it in resumed]
    np.testing.assert_array_equal(np.concatenate([g["tokens"] for g in got]), want["tokens"])
    np.testing.assert_array_equal(np.concatenate([g["label"] for g in got]), want["label"])
  assert not np.array_equal(head[0]["tokens"], head[33]["tokens"])


def test_worker_processes_give_the_same_batches_as_threads(source, centers, cifar_config):
  """config.input_workers > 0 (the ImageNet configs): grain's worker processes reopen the
  ArrayRecord split and give the reader threads' batches."""
  config = cifar_config(train_flip=True, train_crop_fraction=(0.8, 1.0))
  threads = input_pipeline.train_iterator(config, source, centers, local_batch=8, seed=4)
  config.input_workers = 2
  workers = input_pipeline.train_iterator(config, source, centers, local_batch=8, seed=4)
  try:
    for _ in range(6):
      a, b = next(threads), next(workers)
      np.testing.assert_array_equal(a["tokens"], b["tokens"])
      np.testing.assert_array_equal(a["label"], b["label"])
  finally:
    threads.close()
    workers.close()


def test_two_processes_read_disjoint_records_that_make_up_the_epoch():
  config, source = digits_source()
  centers = np.random.default_rng(0).uniform(-1, 1, (64, 3)).astype(np.float32)
  reads = []
  for p in (0, 1):
    counting = CountingRecords(source.splits["train"])
    source.splits["train"] = counting
    try:
      ds = input_pipeline.train_dataset(config, source, centers, local_batch=25, seed=0,
                                        process_index=p, process_count=2)
      for k in range(1350 // 50):  # one epoch: 27 global batches of 50
        ds[k]
    finally:
      source.splits["train"] = counting.records
    reads.append(counting.read)
  a, b = reads
  assert len(a) == len(b) == 675  # each record read once, by the one process that trains on it
  assert not set(a) & set(b)
  assert sorted(a + b) == list(range(1350))


def test_augmentation_is_seeded_by_stream_position():
  """The same record in two epochs gets a different crop/flip; the same position, the same."""
  config, source = digits_source()
  centers = np.random.default_rng(0).uniform(-1, 1, (64, 3)).astype(np.float32)
  table = input_pipeline.palette_table(centers)
  record = source.splits["train"][7]
  kw = dict(seed=0, image_size=8, crop_fraction=(0.6, 1.0), flip=True, table=table)
  outs = [input_pipeline._train_example((g, record), **kw)["tokens"] for g in range(12)]
  assert len({o.tobytes() for o in outs}) > 6
  np.testing.assert_array_equal(input_pipeline._train_example((3, record), **kw)["tokens"],
                                outs[3])


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
  first_image = input_pipeline.eval_images(config, source, "test")[0]["image"]
  assert first_image.shape == (16, 16, 3) and first_image.dtype == np.uint8
  np.testing.assert_array_equal(batches[0]["tokens"][0],
                                np.asarray(palette.quantize(first_image[None], centers))[0])


def test_area_resize_is_box_average_of_the_jpeg(cifar10_dir):
  path = os.path.join(cifar10_dir, "test", "cat", sorted(os.listdir(
      os.path.join(cifar10_dir, "test", "cat")))[0])
  with open(path, "rb") as f:
    raw = input_pipeline.decode(f.read())
  assert raw.shape == (32, 32, 3) and raw.dtype == np.uint8
  out = input_pipeline.preprocess(raw, image_size=16)
  box = raw.astype(np.float64).reshape(16, 2, 16, 2, 3).mean((1, 3))
  assert np.abs(out - np.round(box)).max() <= 1


def test_processes_read_disjoint_eval_shards(source, cifar_config):
  config = cifar_config()
  a, b = (input_pipeline.eval_images(config, source, "validation", process_index=i,
                                     process_count=2) for i in (0, 1))
  assert len(a) + len(b) == 5_000 and abs(len(a) - len(b)) <= 1
  assert a[0]["label"] == source.splits["validation"][0]["label"]
  assert b[0]["label"] == source.splits["validation"][len(a)]["label"]


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_grayscale_and_odd_sized_images(tmp_path):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for label in ("a", "b"):
      for i in range(3):
        size = (20 + i, 37) if label == "a" else (48, 48)
        write_png(str(tmp_path / "imgs" / split / label / f"{i}.png"),
                  rng.integers(0, 256, size=size, dtype=np.uint8))
  config = tiny_config(dataset=str(tmp_path / "imgs"), data_dir=str(tmp_path / "tfds"),
                       image_size=8, holdout_fraction=0.0)
  src = input_pipeline.open_source(config)
  assert src.split_sizes["train"] == 6 and src.num_classes == 2
  images = [ex["image"] for ex in input_pipeline.eval_images(config, src, "train")]
  assert all(im.shape == (8, 8, 3) for im in images)
  assert all(np.array_equal(im[..., 0], im[..., 2]) for im in images)  # gray stays gray


def test_a_folder_is_converted_once_while_another_converter_holds_its_lock(tmp_path, capsys):
  """Two jobs opening one unconverted folder at once (a training and its evaluation, or test
  workers): the second waits on the conversion's file lock and then reads the copy the first
  made, instead of converting into the same place."""
  import threading  # pylint: disable=g-import-not-at-top
  from igpt_jax import atomic  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for label in ("a", "b"):
      for i in range(2):
        write_png(str(tmp_path / "imgs" / split / label / f"{i}.png"),
                  rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
  config = tiny_config(dataset=str(tmp_path / "imgs"), data_dir=str(tmp_path / "tfds"),
                       image_size=8, holdout_fraction=0.0)
  # pylint: disable=protected-access
  builder = input_pipeline._folder_builder(config.dataset, config.data_dir)
  opened = []
  with atomic.exclusive(input_pipeline._conversion_lock(builder)):  # "the first job"
    waiter = threading.Thread(target=lambda: opened.append(input_pipeline.open_source(config)))
    waiter.start()
    waiter.join(timeout=5)
    assert waiter.is_alive() and not opened  # it waits for the lock ...
    builder.download_and_prepare()  # ... while the first job converts
  waiter.join(timeout=60)
  out = capsys.readouterr().out
  assert "Waiting for another process converting" in out
  assert "Converting image folder" not in out  # it read the first job's copy
  assert opened[0].split_sizes["train"] == 4 and opened[0].num_classes == 2


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
  assert "--file_format=array_record" in str(e.value)


def test_unprepared_tfds_dataset_offline_fails_at_once_without_downloading(tmp_path,
                                                                           monkeypatch):
  """With config.download=True (the default) and no route to the dataset's download host, the
  error comes before any download attempt, within the connection timeout, with the commands."""
  import socket
  import time
  import tensorflow_datasets as tfds
  tried = []

  def no_network(address, timeout=None):
    tried.append(address)
    time.sleep(min(timeout, 0.2))
    raise socket.gaierror(-2, "Name or service not known")

  def must_not_download(*args, **kwargs):
    raise AssertionError("download_and_prepare was called")

  monkeypatch.setattr(input_pipeline.socket, "create_connection", no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_download)
  start = time.monotonic()
  with pytest.raises(input_pipeline.DatasetError, match="'cifar10' is not prepared in .* its "
                     "download host www.cs.toronto.edu cannot be reached") as e:
    input_pipeline.open_source(tiny_config(dataset="cifar10", data_dir=str(tmp_path)))
  assert time.monotonic() - start < 30
  assert tried == [("www.cs.toronto.edu", 443)]
  assert "tfds build cifar10 --file_format=array_record" in str(e.value)
  assert "local folder" in str(e.value)


def test_a_host_that_never_answers_is_given_up_on_within_the_timeout(monkeypatch):
  import socket
  import time

  def never_answers(*args, **kwargs):  # its thread outlives the test: it ends as a timeout would
    time.sleep(60)
    raise socket.timeout("timed out")

  monkeypatch.setattr(input_pipeline.socket, "create_connection", never_answers)
  start = time.monotonic()
  assert input_pipeline._unreachable(["a.example", "b.example"], timeout=0.5) == [
      "a.example", "b.example"]
  assert time.monotonic() - start < 5


def test_a_tfds_version_that_does_not_exist_lists_the_ones_that_do(tmp_path):
  with pytest.raises(input_pipeline.DatasetError,
                     match=r"tfds has no version 9.9.9 of 'cifar10'; its versions are "
                           r"\d+\.\d+\.\d+.*\(e\.g\. cifar10:\d+\.\d+\.\d+\)"):
    input_pipeline.open_source(tiny_config(dataset="cifar10:9.9.9", data_dir=str(tmp_path)))


def test_a_dataset_prepared_only_as_tfrecord_names_the_conversion(tmp_path):
  for split in ("train", "test"):
    write_png(str(tmp_path / "imgs" / split / "a" / "0.png"), np.zeros((4, 4, 3), np.uint8))
  root, data_dir = str(tmp_path / "imgs"), str(tmp_path / "tfds")
  image_folder.LocalImageFolder(root, data_dir=data_dir,
                                file_format="tfrecord").download_and_prepare()
  with pytest.raises(input_pipeline.DatasetError, match="only as tfrecord") as e:
    input_pipeline.open_source(tiny_config(dataset=root, data_dir=data_dir))
  assert "tfds convert_format --dataset_version_dir=" in str(e.value)
  assert "--out_file_format=array_record" in str(e.value)


def test_bad_split_name(source, cifar10_dir, tfds_dir):
  config = tiny_config(dataset=cifar10_dir, data_dir=tfds_dir, test_split="validation")
  with pytest.raises(input_pipeline.DatasetError, match="config.test_split='validation'"):
    input_pipeline.open_source(config)


def test_corrupt_image_file_is_named(tmp_path):
  write_png(str(tmp_path / "imgs" / "train" / "x" / "ok.png"), np.zeros((4, 4, 3), np.uint8))
  (tmp_path / "imgs" / "train" / "x" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  config = tiny_config(dataset=str(tmp_path / "imgs"), data_dir=str(tmp_path / "tfds"),
                       test_split="train")
  with pytest.raises(Exception, match="broken.jpg"):
    input_pipeline.open_source(config)


def test_digits_builtin():
  config, src = digits_source()
  assert src.split_sizes == {"train": 1350, "validation": 150, "test": 297}
  centers = np.random.default_rng(0).uniform(-1, 1, size=(64, 3)).astype(np.float32)
  batch = next(input_pipeline.train_iterator(config, src, centers, local_batch=4, seed=0))
  assert batch["tokens"].shape == (4, 64)


def test_padded_random_crop_shifts_the_image_within_the_padding():
  """The CIFAR fine-tuning recipe: pad 4 black pixels a side, crop back at a random offset."""
  image = np.arange(16 * 16 * 3, dtype=np.int64).reshape(16, 16, 3) % 251 + 1
  image = image.astype(np.uint8)  # no zero pixels: padding is recognisable
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  offsets = set()
  for seed in range(40):
    out = input_pipeline.preprocess(image, image_size=16, pad_crop=4,
                                    rng=np.random.default_rng(seed))
    assert out.shape == (16, 16, 3)
    hits = [(y, x) for y in range(9) for x in range(9)
            if np.array_equal(out, padded[y:y + 16, x:x + 16])]
    assert len(hits) == 1  # exactly a window of the padded image
    offsets.add(hits[0])
  assert len(offsets) > 15  # the offsets vary over the 9 x 9 possible
  same = input_pipeline.preprocess(image, image_size=16, pad_crop=4,
                                   rng=np.random.default_rng(3))
  np.testing.assert_array_equal(same, input_pipeline.preprocess(
      image, image_size=16, pad_crop=4, rng=np.random.default_rng(3)))
  # Without an rng (evaluation) nothing is shifted.
  np.testing.assert_array_equal(input_pipeline.preprocess(image, image_size=16, pad_crop=4),
                                image)
