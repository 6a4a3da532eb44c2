"""Input: records read by index with grain -> decode, crop, resize, flip -> palette tokens.

Sources (`config.dataset`), each a random-access sequence of records {'image', 'label'}:
  * a tfds name (`cifar10`, `imagenet2012`, ...) prepared in tfds' ArrayRecord format, read with
    `builder.as_data_source`;
  * a local folder `<split>/<label>/<image file>`, converted once into an ArrayRecord tfds
    dataset (`igpt_jax.image_folder.LocalImageFolder`);
  * `digits`: scikit-learn's 8x8 handwritten digits, built in (in-memory records).
The same grain pipeline reads all three. tf.data is used only by tfds when it prepares data.

Splits: the last `holdout_fraction` of `train_split` is held out as `validation`; `test` is
`test_split`.

Training order. The global stream is a pure function of (seed, g): example g is record
`perm_e[g mod N]` of the train split, where `perm_e` is a seeded permutation for epoch
e = g // N (grain's index shuffle). Global batch k holds stream positions
[start + k B, start + (k + 1) B); process p of P reads only the records of its contiguous slice
of each global batch, by index. So global batches are the same for any process count, no host
reads a record it does not train on, and resuming at position `start` costs the same at any
step. Crops and flips are seeded by (seed, g): they never repeat across hosts.

Batches are host-local numpy dicts: `tokens` int32 [local_batch, image_size**2] in raster order,
`label` int32 [local_batch] and, for evaluation, `mask` bool [local_batch] (False = padding).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import re
import socket
import sys
import threading
from typing import Iterator, Optional, Sequence
from urllib import parse as urlparse

import grain
import numpy as np
from absl import flags
from PIL import Image as PILImage

from igpt_jax import atomic
from igpt_jax import errors
from igpt_jax import image_folder
from igpt_jax import palette as palette_lib

BUILTIN = ("digits",)
FILE_FORMAT = "array_record"


class DatasetError(errors.UserError, RuntimeError):
  """The configured dataset cannot be read; the message says what to do."""


class Records:
  """A random-access view [start, stop) of a record sequence (a tfds data source or arrays)."""

  def __init__(self, base, start: int = 0, stop: Optional[int] = None):
    self._base = base
    self._start = start
    self._stop = len(base) if stop is None else stop

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int):
    return self._base[self._start + index]

  def __getitems__(self, indices: Sequence[int]):
    indices = [self._start + int(i) for i in indices]
    if hasattr(self._base, "__getitems__"):
      return self._base.__getitems__(indices)
    return [self._base[i] for i in indices]

  def head(self, n: int) -> "Records":
    return Records(self._base, self._start, self._start + min(n, len(self)))


class _Arrays:
  """In-memory images uint8 [N, h, w, c] and labels [N] as records."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}


class _TfdsSplit:
  """A split of a prepared ArrayRecord tfds dataset, read by index with images left encoded.

  Pickles as its directory and split name, so grain's worker processes reopen it
  (`tfds.builder_from_directory`) instead of re-creating the builder that prepared it.
  """

  def __init__(self, data_dir: str, split: str):
    self._data_dir, self._split, self._source = data_dir, split, None

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      builder = tfds.builder_from_directory(self._data_dir)
      # Images stay encoded: they are decoded in grain's threads or worker processes.
      self._source = builder.as_data_source(
          split=self._split, decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self):
    return {"_data_dir": self._data_dir, "_split": self._split, "_source": None}

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int):
    return self._open()[index]

  def __getitems__(self, indices: Sequence[int]):
    return self._open().__getitems__(list(indices))


@dataclasses.dataclass
class Source:
  """An opened dataset: the records of each split after the hold-out, and its classes."""

  name: str
  splits: dict  # {"train": Records, "validation": Records, "test": Records}
  num_classes: int
  label_names: list

  @property
  def split_sizes(self) -> dict:
    return {split: len(records) for split, records in self.splits.items()}


def _is_folder(name: str) -> bool:
  return os.sep in name or name.startswith(".") or os.path.isdir(name)


def _data_dir(config) -> Optional[str]:
  """config.data_dir, expanded; a path that exists but is not a folder is refused."""
  if not config.data_dir:
    return None
  path = os.path.expanduser(config.data_dir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise DatasetError(f"config.data_dir={config.data_dir} is a file, not a folder: set it to "
                       "the folder that holds (or will hold) prepared tfds datasets.")
  return path


def _check_random_access(builder, name: str) -> None:
  formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
  if FILE_FORMAT not in formats:
    raise DatasetError(
        f"tfds dataset {name!r} is prepared in {builder.data_dir} only as "
        f"{', '.join(sorted(formats)) or 'an unknown format'}; igpt_jax reads records by index "
        f"and needs the {FILE_FORMAT} format. Convert it in place with `tfds convert_format "
        f"--dataset_version_dir={builder.data_dir} --out_file_format={FILE_FORMAT}`, or "
        f"prepare it again with `tfds build {name} --file_format={FILE_FORMAT}` (into another "
        "config.data_dir).")


def _array_record_builder(make, name: str):
  """make(**kw) -> a builder that reads or writes ArrayRecord; a dataset already prepared in
  another format fails with the command that converts it."""
  try:
    builder = make(file_format=FILE_FORMAT)
    builder.info  # pylint: disable=pointless-statement  # tfds checks the format here
    return builder
  except ValueError as e:
    if "File format is already set" not in str(e):
      raise
  _check_random_access(make(), name)  # raises, naming the format found and the fix
  raise AssertionError("unreachable")


def _find_cause(e: BaseException, kind):
  while e is not None and not isinstance(e, kind):
    e = e.__cause__ or e.__context__
  return e


NETWORK_CHECK_SECONDS = 5.0  # how long to wait for a dataset's download host before saying offline


def _download_hosts(builder) -> list[str]:
  """The hosts a tfds builder downloads from (its registered URLs, else its homepage)."""
  urls = list(getattr(builder, "url_infos", None) or {}) or [builder.info.homepage or ""]
  return sorted({urlparse.urlparse(u).hostname for u in urls} - {None, ""})


def _unreachable(hosts: Sequence[str], timeout: float = NETWORK_CHECK_SECONDS) -> list[str]:
  """The hosts of `hosts` that a TCP connection to port 443 cannot reach within `timeout`
  seconds, name lookup included (each is tried in a daemon thread, all at once)."""
  reached = set()

  def connect(host):
    try:
      socket.create_connection((host, 443), timeout=timeout).close()
      reached.add(host)
    except OSError:
      pass

  threads = [threading.Thread(target=connect, args=(h,), daemon=True) for h in hosts]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout)
  return [h for h in hosts if h not in reached]


def _tfds_builder(name: str, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return _array_record_builder(functools.partial(tfds.builder, name, data_dir=data_dir), name)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(
        f"config.dataset={name!r} is neither a tfds dataset name nor an existing folder. "
        "Use a tfds name (cifar10, cifar100, stl10, imagenet2012, ...), 'digits', or the path "
        "of a folder laid out as <split>/<label>/<image file>.") from e
  except AssertionError as e:  # tfds asserts on a version it does not know
    found = re.search(r"cannot be loaded at version (\S+), only: ([\d., ]*\d)", str(e))
    if found is None:
      raise
    raise DatasetError(
        f"config.dataset={name!r}: tfds has no version {found.group(1)} of "
        f"{name.split(':')[0]!r}; its versions are {found.group(2)}. Name one of them "
        f"(e.g. {name.split(':')[0]}:{found.group(2).split(',')[0].strip()}) or leave the "
        "version out.") from e


def _folder_builder(name: str, data_dir: str):
  """The tfds builder (ArrayRecord) of image folder `name`, its copy kept under `data_dir`."""
  return _array_record_builder(functools.partial(
      image_folder.LocalImageFolder, os.path.expanduser(name), data_dir=data_dir), name)


def _conversion_lock(builder) -> str:
  """The file whose lock one converter of the builder's folder content holds."""
  return str(builder.data_dir).rstrip("/") + ".lock"


def _convert_folder(builder, name: str) -> None:
  print(f"Converting image folder {name} into a tfds dataset at {builder.data_dir} "
        "(once per folder content) ...", flush=True)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except  # tfds wraps the generator's errors
    bad = _find_cause(e, image_folder.ImageFileError)
    raise DatasetError(f"could not convert image folder {name}: "
                       f"{bad or f'{type(e).__name__}: {e}'}") from e


def _open_builder(config):
  name = config.dataset
  if _is_folder(name):
    data_dir = _data_dir(config) or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    builder = _folder_builder(name, data_dir)
    if not builder.is_prepared():
      try:  # the configured root only: tfds moves the finished copy into place itself
        atomic.make_writable_dir(data_dir)
      except OSError as e:
        raise DatasetError(
            f"cannot write the converted copy of image folder {name} under {data_dir} "
            f"({e.strerror}): set config.data_dir to a folder you can write to.") from e
      # One converter per folder content (several jobs or test workers may start at once).
      with atomic.exclusive(_conversion_lock(builder),
                            waiting=f"Waiting for another process converting {name} ..."):
        builder = _folder_builder(name, data_dir)  # another process may have converted it
        if not builder.is_prepared():
          _convert_folder(builder, name)
    _check_random_access(builder, name)
    return builder
  builder = _tfds_builder(name, _data_dir(config))
  if builder.is_prepared():
    _check_random_access(builder, name)
    return builder
  if not config.download:
    raise DatasetError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir} and "
        f"config.download=False. Prepare it (`tfds build {name} --file_format={FILE_FORMAT}`), "
        "set config.data_dir to where it is, or point config.dataset at a local image folder.")
  down = _unreachable(_download_hosts(builder))
  if down:
    raise DatasetError(
        f"tfds dataset {name!r} is not prepared in {builder.data_dir}, and its download host "
        f"{', '.join(down)} cannot be reached (no network?). Prepare it on a machine with "
        f"internet (`tfds build {name} --file_format={FILE_FORMAT}`) and copy the folder it "
        "writes under config.data_dir, or set config.dataset to a local folder laid out as "
        "<split>/<label>/<image file>.")
  try:
    builder.download_and_prepare()
  except Exception as e:  # Network, manual-download and disk errors all end here.
    raise DatasetError(
        f"could not download and prepare tfds dataset {name!r} into {builder.data_dir}: "
        f"{type(e).__name__}: {str(e)[:500]}\nWithout internet, prepare it on another "
        f"machine (`tfds build {name} --file_format={FILE_FORMAT}`) and copy it under "
        "config.data_dir, or set config.dataset to a local folder laid out as "
        "<split>/<label>/<image file>.") from e
  return builder


def _open_splits(config) -> tuple[dict, int, list]:
  """({split name: records}, num_classes, label names) of every split of config.dataset."""
  if config.dataset in BUILTIN:
    arrays = image_folder.digits_arrays()
    return ({s: _Arrays(*arrays[s]) for s in arrays}, 10, [str(i) for i in range(10)])
  builder = _open_builder(config)
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise DatasetError(f"dataset {config.dataset!r} has features {list(features.keys())}; "
                       "igpt_jax needs 'image' and 'label'.")
  splits = {s: _TfdsSplit(str(builder.data_dir), s) for s in builder.info.splits.keys()}
  return splits, features["label"].num_classes, list(features["label"].names)


def open_source(config) -> Source:
  """Opens `config.dataset` or fails at once with a message that says what to do."""
  splits, num_classes, names = _open_splits(config)
  for field in ("train_split", "test_split"):
    if config[field] not in splits:
      raise DatasetError(f"config.{field}={config[field]!r} is not a split of "
                         f"{config.dataset!r}; its splits are {sorted(splits)}.")
  train = splits[config.train_split]
  n_train = len(train)
  cut = n_train - int(round(n_train * config.holdout_fraction))
  return Source(config.dataset,
                {"train": Records(train, 0, cut), "validation": Records(train, cut, n_train),
                 "test": Records(splits[config.test_split])},
                num_classes, names)


# --- per-example work (runs in grain's threads or worker processes) -------------------------

def decode(image) -> np.ndarray:
  """An encoded image file (bytes) or an array [h, w, 1|3] -> RGB uint8 [h, w, 3]."""
  if isinstance(image, (bytes, np.bytes_)):
    with PILImage.open(io.BytesIO(image)) as im:
      if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit gray: keep the top 8 bits
        wide = np.asarray(im, np.uint32)
        shift = 8 if im.mode.startswith("I;16") else 24
        return np.repeat((wide >> shift).astype(np.uint8)[..., None], 3, axis=-1)
      return np.asarray(im.convert("RGB"))
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def preprocess(image: np.ndarray, *, image_size: int, crop_fraction=(1.0, 1.0),
               flip: bool = False, rng: Optional[np.random.Generator] = None,
               pad_crop: int = 0) -> np.ndarray:
  """RGB uint8 [h, w, 3] -> uint8 [image_size, image_size, 3].

  A square crop whose side is a fraction of the short side (random fraction and position when
  `rng` is given, else the centre at `crop_fraction[1]`), an area (box-filter) resize to the
  model resolution as in the paper, then, with `rng`, the CIFAR recipe's random crop of the
  resized image padded by `pad_crop` black pixels on each side, and an optional random
  horizontal flip.
  """
  h, w = image.shape[:2]
  short = min(h, w)
  lo, hi = crop_fraction
  if rng is None:
    side = max(int(round(hi * short)), 1)
    oy, ox = (h - side) // 2, (w - side) // 2
  else:
    side = max(int(round(rng.uniform(lo, hi) * short)), 1)
    oy, ox = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  out = np.asarray(PILImage.fromarray(image).resize(
      (image_size, image_size), PILImage.Resampling.BOX, box=(ox, oy, ox + side, oy + side)))
  if rng is not None and pad_crop > 0:
    padded = np.pad(out, ((pad_crop, pad_crop), (pad_crop, pad_crop), (0, 0)))
    y, x = (int(v) for v in rng.integers(0, 2 * pad_crop + 1, size=2))
    out = padded[y:y + image_size, x:x + image_size]
  if rng is not None and flip and rng.uniform() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def _train_example(item, *, seed: int, image_size: int, crop_fraction, flip: bool, table,
                   pad_crop: int = 0):
  g, record = item
  rng = np.random.default_rng([seed, g])  # the augmentation of stream position g
  image = preprocess(decode(record["image"]), image_size=image_size,
                     crop_fraction=crop_fraction, flip=flip, rng=rng, pad_crop=pad_crop)
  return {"tokens": palette_lib.quantize_with_table(image, table),
          "label": np.int32(record["label"])}


def _eval_example(record, *, image_size: int) -> dict:
  return {"image": preprocess(decode(record["image"]), image_size=image_size),
          "label": np.int32(record["label"])}


def _tokenize(batch: dict, *, table) -> dict:
  return {"tokens": palette_lib.quantize_with_table(batch["image"], table),
          "label": batch["label"]}


@functools.lru_cache(maxsize=4)
def _table(key: bytes, k: int) -> np.ndarray:
  return palette_lib.lookup_table(np.frombuffer(key, np.float32).reshape(k, 3))


def palette_table(centers) -> np.ndarray:
  """The palette's color -> token table (built once per palette and process, ~1-4 s)."""
  centers = np.ascontiguousarray(centers, np.float32)
  return _table(centers.tobytes(), len(centers))


# --- the training stream ----------------------------------------------------------------------

class ProcessShare(grain.MapDataset):
  """Element i: (g, stream[g]) for this process's i-th example of the global stream.

  g = start + (i // local_batch) * global_batch + process_index * local_batch
      + i % local_batch
  """

  def __init__(self, stream: grain.MapDataset, *, start: int, global_batch: int,
               local_batch: int, process_index: int):
    super().__init__(stream)
    self._start, self._global, self._local = start, global_batch, local_batch
    self._offset = process_index * local_batch

  def __len__(self) -> int:
    return sys.maxsize

  def global_index(self, index: int) -> int:
    k, j = divmod(index, self._local)
    return self._start + k * self._global + self._offset + j

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g = self.global_index(index)
    return g, self._parent[g]

  def _getitems(self, indices):
    gs = [self.global_index(i) for i in indices]
    return list(zip(gs, self._parent._getitems(gs)))  # pylint: disable=protected-access

  def __str__(self) -> str:
    return f"ProcessShare(start={self._start}, +{self._offset}, {self._local}/{self._global})"


def global_stream(records, seed: int) -> grain.MapDataset:
  """The endless training stream: element g is record perm_{g // N}[g mod N]."""
  return grain.MapDataset.source(records).shuffle(seed=seed % 2**32).repeat()


def train_dataset(config, source: Source, centers, *, local_batch: int, seed: int,
                  start_index: int = 0, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """This process's training batches from stream position `start_index`, by index.

  Element k is the local slice of global batch k (global batch = local_batch * process_count):
  a dict `tokens` int32 [local_batch, seq_len], `label` int32 [local_batch].
  """
  if len(source.splits["train"]) == 0:
    raise DatasetError(f"the training split of {source.name!r} is empty; lower "
                       "config.holdout_fraction or use a larger dataset.")
  share = ProcessShare(global_stream(source.splits["train"], seed), start=start_index,
                       global_batch=local_batch * process_count, local_batch=local_batch,
                       process_index=process_index)
  example = functools.partial(
      _train_example, seed=seed, image_size=config.image_size,
      crop_fraction=tuple(config.train_crop_fraction), flip=config.train_flip,
      table=palette_table(centers), pad_crop=config.get("train_pad_crop", 0))
  return share.map(example).batch(local_batch, drop_remainder=True)


def iterate(ds: grain.MapDataset, config) -> grain.DatasetIterator:
  """Runs `ds` in grain's reader threads (and worker processes, config.input_workers)."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.input_threads,
                                            prefetch_buffer_size=config.input_prefetch))
  if config.input_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (notebooks, scripts)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.input_workers))
  return iter(it)


def train_iterator(config, source: Source, centers, *, local_batch: int, seed: int,
                   start_index: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict]:
  """The endless, shuffled, augmented stream of this process's batches (`train_dataset`).

  Closing the generator (or dropping it) stops grain's reader threads and worker processes.
  """
  it = iterate(train_dataset(config, source, centers, local_batch=local_batch, seed=seed,
                             start_index=start_index, process_index=process_index,
                             process_count=process_count), config)
  try:
    yield from it
  finally:
    it.close()


# --- evaluation ---------------------------------------------------------------------------------

def eval_images(config, source: Source, split: str, *, process_index: int = 0,
                process_count: int = 1, sharded: bool = True) -> grain.MapDataset:
  """Centre-cropped, resized images {'image' uint8 [S, S, 3], 'label'} of this process's
  contiguous share of `split` (all of it with sharded=False), in a fixed order."""
  records = source.splits[split]
  ds = grain.MapDataset.source(records)
  if sharded:
    bounds = np.linspace(0, len(records), process_count + 1).round().astype(int)
    ds = ds[int(bounds[process_index]):int(bounds[process_index + 1])]
  return ds.map(functools.partial(_eval_example, image_size=config.image_size))


def num_eval_batches(source: Source, split: str, local_batch: int, process_count: int) -> int:
  """Batches every process runs over `split`, the same on all (the longest slice decides)."""
  return math.ceil(math.ceil(source.split_sizes[split] / process_count) / local_batch)


def eval_iterator(config, source: Source, centers, split: str, *, local_batch: int,
                  num_batches: int = -1, process_index: int = 0, process_count: int = 1,
                  start_batch: int = 0) -> Iterator[dict]:
  """Batches `start_batch` .. `num_batches` - 1 (-1: to the end of the split), padded to
  `local_batch` with a mask. Batches are read by index: starting late costs nothing."""
  total = num_eval_batches(source, split, local_batch, process_count)
  num_batches = total if num_batches == -1 else min(num_batches, total)
  ds = eval_images(config, source, split, process_index=process_index,
                   process_count=process_count)
  ds = ds.batch(local_batch).map(functools.partial(_tokenize, table=palette_table(centers)))
  it = iterate(ds[start_batch:num_batches], config)
  seq_len = config.image_size**2
  try:
    for _ in range(max(num_batches - start_batch, 0)):
      b = next(it, None)
      n = 0 if b is None else len(b["label"])
      tokens = np.zeros((local_batch, seq_len), np.int32)
      labels = np.zeros((local_batch,), np.int32)
      if n:
        tokens[:n], labels[:n] = b["tokens"], b["label"]
      yield {"tokens": tokens, "label": labels, "mask": np.arange(local_batch) < n}
  finally:
    it.close()


def palette_pixels(config, source: Source) -> tuple[np.ndarray, int]:
  """(RGB uint8 pixels [<= palette_fit_pixels, 3] drawn from the first training images, how
  many images they were drawn from).

  Every process reads the same images, so all of them would fit the same palette.
  """
  n = min(config.palette_fit_images, source.split_sizes["train"])
  if n == 0:
    raise DatasetError(f"the training split of {source.name!r} is empty: there is nothing to "
                       "fit a palette on or train with. Lower config.holdout_fraction or use a "
                       "larger dataset.")
  ds = eval_images(config, source, "train", sharded=False)[:n].batch(256)
  pixels = np.concatenate([b["image"].reshape(-1, 3) for b in iterate(ds, config)])
  rng = np.random.default_rng(config.seed)
  take = min(config.palette_fit_pixels, len(pixels))
  return pixels[rng.choice(len(pixels), take, replace=False)], n
