"""A tfds builder that turns a local folder `<split>/<label>/<image file>` into a real tfds dataset.

Unlike `tfds.folder_dataset.ImageFolder`, which re-reads loose files on every pass, this
converts the folder once into tfds' ArrayRecord format (the original encoded bytes, not
re-encoded, in an order shuffled by tfds), so records are read by index like any tfds data
source. Each source folder gets its own prepared copy under `data_dir`, keyed by its absolute
path and its content (every image's name, size and modification time): a folder that changed
after its conversion is converted again, never silently read as it was. Corrupt or empty image
files fail the conversion with the file named.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image as PILImage

from igpt_jax import errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def _listdirs(path):
  return sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))


def scan_folder(root: str) -> dict[str, list[tuple[str, str]]]:
  """Returns {split: [(image path, label name), ...]} for a `<split>/<label>/<file>` tree."""
  if os.path.isfile(root):
    archive = root.endswith((".tar.gz", ".tgz", ".tar", ".zip", ".tar.bz2", ".tar.xz"))
    raise errors.MissingError(
        f"config.dataset={root} is " + ("an archive" if archive else "a file") + ", not a "
        "folder: " + (f"extract it (e.g. mkdir DIR && tar -xf {root} -C DIR) and pass the "
                      "folder that holds <split>/<label>/<image file>." if archive else
                      "pass a folder laid out as <split>/<label>/<image file>, or a tfds name."))
  if not os.path.isdir(root):
    raise errors.MissingError(
        f"dataset folder {root} does not exist. config.dataset must be a tfds name or a folder "
        "laid out as <split>/<label>/<image file> (e.g. train/cat/0001.jpg).")
  splits = {}
  ignored = {"files that are not images": 0, "folders below <split>/<label>/": 0,
             "broken links": 0}
  empty_labels = []
  for split in _listdirs(root):
    items = []
    for label in _listdirs(os.path.join(root, split)):
      folder = os.path.join(root, split, label)
      found = []
      for f in sorted(os.listdir(folder)):
        path = os.path.join(folder, f)
        if os.path.isdir(path):
          ignored["folders below <split>/<label>/"] += 1
        elif not f.lower().endswith(IMAGE_EXTENSIONS):
          ignored["files that are not images"] += 1
        elif not os.path.isfile(path):
          ignored["broken links"] += 1
        else:
          found.append((path, label))
      if not found:
        empty_labels.append(f"{split}/{label}")
      items += found
    if items:
      splits[split] = items
  said = [f"{n} {what}" for what, n in ignored.items() if n]
  if empty_labels:
    said.append(f"{len(empty_labels)} label folder(s) with no image ({', '.join(empty_labels[:5])}"
                f"{', ...' if len(empty_labels) > 5 else ''})")
  if said:
    print(f"Warning: dataset folder {root}: ignored {'; '.join(said)} (images are read from "
          f"<split>/<label>/<file> with extensions {', '.join(IMAGE_EXTENSIONS)}).", flush=True)
  if not splits:
    raise errors.MissingError(
        f"dataset folder {root} holds no images in the layout <split>/<label>/<image file> "
        f"(extensions {IMAGE_EXTENSIONS}).")
  return splits


class ImageFileError(errors.UserError, ValueError):
  """An image file in a dataset folder is empty or cannot be decoded."""


def check_image(path: str) -> None:
  """Raises ImageFileError naming `path` if it is empty or not a decodable image."""
  if os.path.getsize(path) == 0:
    raise ImageFileError(f"image file {path} is empty; delete or replace it.")
  try:
    with PILImage.open(path) as im:
      im.verify()
  except Exception as e:  # PIL raises many types for corrupt files.
    raise ImageFileError(f"image file {path} is corrupt or not an image ({e}); delete or "
                         "replace it.") from e


def content_key(root: str, splits: dict) -> str:
  """A digest of the folder's path and every image's relative name, size and mtime."""
  digest = hashlib.sha1(os.path.abspath(root).encode())
  for split in sorted(splits):
    for path, label in splits[split]:
      st = os.stat(path)
      digest.update(f"{os.path.relpath(path, root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n"
                    .encode())
  return digest.hexdigest()[:10]


def prepared_dir(root: str, data_dir: str, splits: dict) -> str:
  root = os.path.abspath(root)
  return os.path.join(data_dir, "igpt_image_folders",
                      f"{os.path.basename(root)}-{content_key(root, splits)}")


class LocalImageFolder(tfds.core.GeneratorBasedBuilder):
  """Images from `<root>/<split>/<label>/<file>`; features: image (RGB uint8), label."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "Written in ArrayRecord format (random access with grain).",
                   "1.0.0": "TFRecord format."}

  def __init__(self, root: str, *, data_dir: str, **kwargs):
    self._root = os.path.abspath(root)
    self._splits = scan_folder(self._root)
    self._labels = sorted({label for items in self._splits.values() for _, label in items})
    super().__init__(data_dir=prepared_dir(self._root, data_dir, self._splits), **kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        description=f"Local image folder {self._root}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=self._labels),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(items) for split, items in self._splits.items()}

  def _generate_examples(self, items):
    for index, (path, label) in enumerate(items):
      check_image(path)
      yield index, {"image": path, "label": label}


def digits_arrays():
  """scikit-learn's 1,797 handwritten digits as uint8 [N, 8, 8, 1] (0..255) and labels.

  A fixed split: the first 1,500 images are `train`, the remaining 297 `test`.
  """
  pixels, labels = _digits_table()
  images = np.rint(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return {"train": (images[:1500], labels[:1500]), "test": (images[1500:], labels[1500:])}


def _digits_table():
  """scikit-learn's digits table (pixels 0..16 [N, 64], labels [N]), read from the file it
  ships: importing scikit-learn for it took 2 s of every quickstart tool's start."""
  spec = importlib.util.find_spec("sklearn")
  path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
  if not os.path.exists(path):  # another layout: let scikit-learn read it
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    d = load_digits()
    return d.data, d.target.astype(np.int64)
  table = np.loadtxt(path, delimiter=",", dtype=np.float64)
  return table[:, :-1], table[:, -1].astype(np.int64)


def extract_archive(archive: str, cache_dir: str) -> str:
  """Extracts a .tar.gz of an image folder into `cache_dir` once; returns the folder path.

  The folder is the archive's single top-level directory if it has one, else `cache_dir/<name>`.
  A finished extraction is marked with a `.complete` file, so an interrupted one is redone.
  """
  name = os.path.basename(archive).split(".")[0]
  dest = os.path.join(cache_dir, name)
  marker = os.path.join(dest, ".complete")
  if not os.path.exists(marker):
    if not os.path.exists(archive):
      raise errors.MissingError(f"archive {archive} does not exist.")
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive) as tar:
      tar.extractall(dest, filter="data")
    open(marker, "w").close()
  entries = [e for e in os.listdir(dest) if not e.startswith(".")]
  if len(entries) == 1 and os.path.isdir(os.path.join(dest, entries[0])):
    inner = os.path.join(dest, entries[0])  # e.g. cifar10/{train,test}/... inside the archive
    if not any(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(inner)
               for f in files[:1] if _ == inner or os.path.dirname(_) == inner):
      return inner
  return dest
