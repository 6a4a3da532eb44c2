"""tf-datasets input: any source -> resize -> crop/flip -> palette tokens -> numpy batches.

Sources (`config.dataset`):
  * a tfds name (`cifar10`, `imagenet2012`, ...), through `tfds.builder` as `tfds.load` does;
  * a local folder `<split>/<label>/<image file>`, converted once into a tfds dataset
    (`igpt_jax.image_folder.LocalImageFolder`);
  * `digits`: scikit-learn's 8x8 handwritten digits, built in, for the quickstart.

Splits: the last `holdout_fraction` of `train_split` is held out as `validation`; `test` is
`test_split`. Each process reads only its own slice of every split.

Batches are host-local numpy dicts: `tokens` int32 [local_batch, image_size**2] in raster order,
`label` int32 [local_batch] and, for evaluation, `mask` bool [local_batch] (False = padding).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from igpt_jax import image_folder

AUTOTUNE = tf.data.AUTOTUNE
BUILTIN = ("digits",)


class DatasetError(RuntimeError):
  """The configured dataset cannot be read; the message says what to do."""


@dataclasses.dataclass
class Source:
  """An opened dataset: a tfds builder, or in-memory arrays for the built-in `digits`."""

  name: str
  builder: Optional[tfds.core.DatasetBuilder]
  arrays: Optional[dict]
  split_sizes: dict  # {"train": n, "validation": n, "test": n} after the hold-out.
  split_specs: dict  # tfds split strings, e.g. {"train": "train[:45000]", ...}
  num_classes: int


def _is_folder(name: str) -> bool:
  return os.sep in name or name.startswith(".") or os.path.isdir(name)


def _data_dir(config) -> Optional[str]:
  return os.path.expanduser(config.data_dir) if config.data_dir else None


def _open_builder(config):
  name = config.dataset
  if _is_folder(name):
    data_dir = _data_dir(config) or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    builder = image_folder.LocalImageFolder(os.path.expanduser(name), data_dir=data_dir)
    if not builder.is_prepared():
      print(f"Converting image folder {name} into a tfds dataset at {builder.data_dir} "
            "(once) ...", flush=True)
      builder.download_and_prepare()
    return builder
  try:
    builder = tfds.builder(name, data_dir=_data_dir(config))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetError(
        f"config.dataset={name!r} is neither a tfds dataset name nor an existing folder. "
        "Use a tfds name (cifar10, cifar100, stl10, imagenet2012, ...), 'digits', or the path "
        "of a folder laid out as <split>/<label>/<image file>.") from e
  if not builder.is_prepared():
    if not config.download:
      raise DatasetError(
          f"tfds dataset {name!r} is not prepared in {builder.data_dir} and "
          "config.download=False. Prepare it (`tfds build {name}`), set config.data_dir to "
          "where it is, or point config.dataset at a local image folder.")
    try:
      builder.download_and_prepare()
    except Exception as e:  # Network, manual-download and disk errors all end here.
      raise DatasetError(
          f"could not download and prepare tfds dataset {name!r} into {builder.data_dir}: "
          f"{type(e).__name__}: {str(e)[:500]}\nWithout internet, prepare it on another "
          f"machine (`tfds build {name}`) and copy it under config.data_dir, or set "
          "config.dataset to a local folder laid out as <split>/<label>/<image file>.") from e
  return builder


def open_source(config) -> Source:
  """Opens `config.dataset` or fails at once with a message that says what to do."""
  if config.dataset in BUILTIN:
    arrays = image_folder.digits_arrays()
    sizes = {"train": len(arrays["train"][0]), "test": len(arrays["test"][0])}
    builder, num_classes = None, 10
  else:
    builder = _open_builder(config)
    sizes = {s: builder.info.splits[s].num_examples for s in builder.info.splits.keys()}
    features = builder.info.features
    if "image" not in features or "label" not in features:
      raise DatasetError(f"dataset {config.dataset!r} has features {list(features.keys())}; "
                         "igpt_jax needs 'image' and 'label'.")
    num_classes = features["label"].num_classes
    arrays = None
  for field in ("train_split", "test_split"):
    if config[field] not in sizes:
      raise DatasetError(f"config.{field}={config[field]!r} is not a split of "
                         f"{config.dataset!r}; its splits are {sorted(sizes)}.")
  n_train = sizes[config.train_split]
  cut = n_train - int(round(n_train * config.holdout_fraction))
  specs = {"train": f"{config.train_split}[:{cut}]",
           "validation": f"{config.train_split}[{cut}:]",
           "test": config.test_split}
  split_sizes = {"train": cut, "validation": n_train - cut, "test": sizes[config.test_split]}
  return Source(config.dataset, builder, arrays, split_sizes, specs, num_classes)


def _read(source: Source, split: str, *, shuffle_files: bool, seed: int,
          process_index: int, process_count: int, sharded: bool = True) -> tf.data.Dataset:
  """Encoded examples {'image', 'label'} of this process's slice of `split`."""
  spec = source.split_specs[split]
  if source.arrays is not None:
    base, _, rest = spec.partition("[")
    images, labels = source.arrays[base]
    if rest:
      lo, hi = rest.rstrip("]").split(":")
      sl = slice(int(lo) if lo else None, int(hi) if hi else None)
      images, labels = images[sl], labels[sl]
    if sharded:
      idx = np.array_split(np.arange(len(images)), process_count)[process_index]
      images, labels = images[idx], labels[idx]
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  if sharded:
    spec = tfds.even_splits(spec, n=process_count)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
  return source.builder.as_dataset(split=spec, shuffle_files=shuffle_files,
                                   read_config=read_config,
                                   decoders={"image": tfds.decode.SkipDecoding()})


def _decode(image):
  if image.dtype == tf.string:
    return tf.io.decode_image(image, channels=3, expand_animations=False)
  if image.shape[-1] == 1:
    return tf.image.grayscale_to_rgb(image)
  return image


def preprocess(image, *, image_size: int, crop_fraction=(1.0, 1.0), flip: bool = False,
               seed=None):
  """RGB uint8 [h, w, 3] -> uint8 [image_size, image_size, 3].

  A square crop whose side is a fraction of the short side (random fraction and position when
  `seed` is given, else the centre at `crop_fraction[1]`), an area downsample to the model
  resolution as in the paper, then an optional random horizontal flip.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.cast(tf.minimum(h, w), tf.float32)
  lo, hi = crop_fraction
  if seed is None:
    side = tf.cast(tf.round(hi * short), tf.int32)
    oy, ox = (h - side) // 2, (w - side) // 2
  else:
    seeds = tf.random.experimental.stateless_split(seed, 4)
    frac = tf.random.stateless_uniform([], seeds[0], lo, hi)
    side = tf.maximum(tf.cast(tf.round(frac * short), tf.int32), 1)
    oy = tf.random.stateless_uniform([], seeds[1], 0, h - side + 1, dtype=tf.int32)
    ox = tf.random.stateless_uniform([], seeds[2], 0, w - side + 1, dtype=tf.int32)
  crop = image[oy:oy + side, ox:ox + side]
  out = tf.image.resize(tf.cast(crop, tf.float32), (image_size, image_size), method="area")
  out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
  if flip and seed is not None:
    out = tf.image.stateless_random_flip_left_right(out, seeds[3])
  return out


def quantize_tf(image, centers):
  """uint8 [H, W, 3] -> int32 tokens [H*W]; the same math as `palette.quantize`."""
  x = tf.reshape(tf.cast(image, tf.float32) / 127.5 - 1.0, (-1, 1, 3))
  c = tf.constant(centers, tf.float32)
  d = ((x[..., 0] - c[:, 0]) ** 2 + (x[..., 1] - c[:, 1]) ** 2 + (x[..., 2] - c[:, 2]) ** 2)
  return tf.cast(tf.argmin(d, axis=-1), tf.int32)


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def train_iterator(config, source: Source, centers, *, local_batch: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   skip_batches: int = 0) -> Iterator[dict]:
  """An endless, shuffled, augmented stream of training batches, deterministic in `seed`.

  `config.input_order`: "global" (every process reads the whole split in one seeded order and
  keeps its slice of each global batch: the same global batches for any process count, at the
  cost of each process reading every encoded example) or "per_process" (each process shuffles
  only its own shard: the usual choice for ImageNet-sized data).

  `skip_batches` resumes the stream exactly where a run that consumed that many batches left
  it: the skipped examples pass through the shuffle (cheap, still encoded) but are not decoded.
  """
  global_order = config.input_order == "global"
  ds = _read(source, "train", shuffle_files=True, seed=seed, process_index=process_index,
             process_count=process_count, sharded=not global_order)
  if config.cache_data:
    ds = ds.cache()
  ds = ds.repeat().shuffle(config.shuffle_buffer, seed=seed).enumerate()
  if global_order:
    # Every process walks the same global order and keeps its slice of each global batch
    # (process p: examples [p * local_batch, (p + 1) * local_batch) of it), decoding only
    # those; the global batches do not depend on the number of processes.
    ds = ds.skip(skip_batches * local_batch * process_count)
    ds = ds.filter(lambda i, _: (i // local_batch) % process_count == process_index)
  elif skip_batches:
    ds = ds.skip(skip_batches * local_batch)

  def process(index, ex):
    example_seed = tf.stack([tf.cast(seed, tf.int64), index])
    image = preprocess(_decode(ex["image"]), image_size=config.image_size,
                       crop_fraction=tuple(config.train_crop_fraction),
                       flip=config.train_flip, seed=example_seed)
    return {"tokens": quantize_tf(image, centers), "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(process, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE).with_options(_options())
  return ds.as_numpy_iterator()


def eval_images(config, source: Source, split: str, *, process_index: int = 0,
                process_count: int = 1, sharded: bool = True) -> tf.data.Dataset:
  """Centre-cropped, resized uint8 images and labels of one split, in a fixed order."""
  ds = _read(source, split, shuffle_files=False, seed=0, process_index=process_index,
             process_count=process_count, sharded=sharded)

  def process(ex):
    image = preprocess(_decode(ex["image"]), image_size=config.image_size)
    return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

  return ds.map(process, num_parallel_calls=AUTOTUNE, deterministic=True).with_options(
      _options())


def num_eval_batches(source: Source, split: str, local_batch: int, process_count: int) -> int:
  """Batches every process runs over `split`, the same on all (the longest slice decides)."""
  return math.ceil(math.ceil(source.split_sizes[split] / process_count) / local_batch)


def eval_iterator(config, source: Source, centers, split: str, *, local_batch: int,
                  num_batches: int = -1, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Exactly `num_batches` batches (-1: the whole split) padded to `local_batch` with a mask."""
  total = num_eval_batches(source, split, local_batch, process_count)
  num_batches = total if num_batches == -1 else min(num_batches, total)
  ds = eval_images(config, source, split, process_index=process_index,
                   process_count=process_count)
  ds = ds.map(lambda ex: {"tokens": quantize_tf(ex["image"], centers), "label": ex["label"]},
              num_parallel_calls=AUTOTUNE, deterministic=True)
  it = ds.batch(local_batch).prefetch(AUTOTUNE).as_numpy_iterator()
  seq_len = config.image_size**2
  for _ in range(num_batches):
    b = next(it, None)
    n = 0 if b is None else len(b["label"])
    tokens = np.zeros((local_batch, seq_len), np.int32)
    labels = np.zeros((local_batch,), np.int32)
    if n:
      tokens[:n], labels[:n] = b["tokens"], b["label"]
    yield {"tokens": tokens, "label": labels, "mask": np.arange(local_batch) < n}


def palette_pixels(config, source: Source) -> np.ndarray:
  """RGB uint8 pixels [palette_fit_pixels, 3] drawn from the first training images.

  Every process reads the same images, so all of them would fit the same palette.
  """
  ds = eval_images(config, source, "train", sharded=False).take(config.palette_fit_images)
  images = np.stack([ex["image"] for ex in ds.as_numpy_iterator()])
  pixels = images.reshape(-1, 3)
  rng = np.random.default_rng(config.seed)
  take = min(config.palette_fit_pixels, len(pixels))
  return pixels[rng.choice(len(pixels), take, replace=False)]
