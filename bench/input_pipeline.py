r"""Input throughput and resume start-up of igpt_jax (grain) beside the old tf.data pipeline.

  python bench/input_pipeline.py --archive=../shared/data/cifar10_jpeg.tar.gz

On the real CIFAR-10 JPEG folder, in one run, for each of --sizes (32 and 64: a 32x32 image is
kept or upsampled, as ImageNet images are downsampled) with batch --batch (128, the paper's):
  * images/s per host of the training stream (decode, random crop, area resize, flip, palette
    quantisation, batching) over --batches batches after the first, for igpt_jax's grain
    pipeline (config.input_threads / input_workers) and for the tf.data pipeline it replaced
    (bench/tf_data_reference.py, on a TFRecord copy of the same folder);
  * time to the first batch of a run resumed at each of --resume_steps (batch --batch), for
    both; the old pipeline skipped step x batch records through its shuffle buffer, so steps
    above --old_resume_max_step are predicted from its measured rate instead of run.
The palette is 512 colors fitted on the folder's images (k-means, as training does); the grain
pipeline's color table is built once per palette and its time is printed separately.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("archive", os.environ.get("IGPT_CIFAR10_ARCHIVE", ""),
                    "cifar10_jpeg.tar.gz (or set --folder).")
flags.DEFINE_string("folder", "", "An extracted <split>/<label>/<image> folder.")
flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/igpt_jax_bench"),
                    "Where the archive is extracted and the tfds copies are prepared.")
flags.DEFINE_list("sizes", ["32", "64"], "Model resolutions to measure.")
flags.DEFINE_integer("batch", 128, "Global batch (one host).")
flags.DEFINE_integer("batches", 40, "Timed batches per measurement (after the first).")
flags.DEFINE_integer("threads", 4, "config.input_threads for the grain pipeline.")
flags.DEFINE_integer("workers", 0, "config.input_workers for the grain pipeline.")
flags.DEFINE_list("resume_steps", ["0", "10000", "1000000"], "Steps to time a resume at.")
flags.DEFINE_integer("old_resume_max_step", 10_000,
                     "Largest step at which the old pipeline's resume is run, not predicted.")


def _rate(it, batches: int, batch: int) -> float:
  next(it)  # start-up and the first batch are not counted
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - t0)


def _first_batch_s(make) -> float:
  t0 = time.perf_counter()
  next(make())
  return time.perf_counter() - t0


def main(argv):
  del argv
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import image_folder  # pylint: disable=g-import-not-at-top
  from igpt_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from igpt_jax import palette as palette_lib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import tf_data_reference  # pylint: disable=g-import-not-at-top

  folder = FLAGS.folder
  if not folder:
    if not FLAGS.archive:
      raise app.UsageError("give --archive=cifar10_jpeg.tar.gz or --folder=DIR")
    folder = image_folder.extract_archive(FLAGS.archive, FLAGS.cache_dir)
  config = config_lib.base_config()
  config.dataset, config.data_dir = folder, os.path.join(FLAGS.cache_dir, "tfds")
  config.input_threads, config.input_workers = FLAGS.threads, FLAGS.workers
  config.holdout_fraction = 0.0
  source = input_pipeline.open_source(config)
  old_builder = image_folder.LocalImageFolder(
      folder, data_dir=os.path.join(FLAGS.cache_dir, "tfds_tfrecord"), file_format="tfrecord")
  if not old_builder.is_prepared():
    old_builder.download_and_prepare()
  n = source.split_sizes["train"]
  config.image_size, config.palette_fit_images, config.palette_fit_pixels = 32, 2_000, 100_000
  centers = palette_lib.fit(input_pipeline.palette_pixels(config, source)[0], 512,
                            iterations=10)
  t0 = time.perf_counter()
  input_pipeline.palette_table(centers)
  table_s = time.perf_counter() - t0
  print(f"CIFAR-10 train: {n:,} JPEG images; batch {FLAGS.batch}; {os.cpu_count()} CPU cores; "
        f"grain threads {FLAGS.threads}, workers {FLAGS.workers}; palette 512 colors (color "
        f"table built once in {table_s:.1f} s)\n", flush=True)

  b = FLAGS.batch
  print("| resolution | igpt_jax (grain) images/s | tf.data (old) images/s | ratio |")
  print("|---|---|---|---|")
  for size in map(int, FLAGS.sizes):
    config.image_size = size
    config.train_crop_fraction, config.train_flip = (0.875, 1.0), True
    new = _rate(input_pipeline.train_iterator(config, source, centers, local_batch=b, seed=0),
                FLAGS.batches, b)
    old = _rate(tf_data_reference.train_iterator(
        old_builder, "train", centers, image_size=size, crop_fraction=(0.875, 1.0), flip=True,
        local_batch=b, seed=0), FLAGS.batches, b)
    print(f"| {size}x{size} | {new:,.0f} | {old:,.0f} | {new / old:.2f}x |", flush=True)

  config.image_size = 32
  print("\n| resumed at step | igpt_jax (grain) first batch, s | tf.data (old) first batch, s |")
  print("|---|---|---|")
  old_rate = None  # skipped records per second, from the largest step actually run
  for step in map(int, FLAGS.resume_steps):
    new = statistics.median(_first_batch_s(lambda: input_pipeline.train_iterator(
        config, source, centers, local_batch=b, seed=0, start_index=step * b))
        for _ in range(3))
    def old_make(step=step):
      return tf_data_reference.train_iterator(
          old_builder, "train", centers, image_size=32, crop_fraction=(0.875, 1.0), flip=True,
          local_batch=b, seed=0, skip_batches=step)
    if step <= FLAGS.old_resume_max_step:
      old_s = _first_batch_s(old_make)
      if step:
        old_rate = step * b / old_s
      old_txt = f"{old_s:.2f}"
    else:
      old_txt = (f"~{step * b / old_rate:,.0f} (predicted: {step * b:,} records skipped at "
                 f"{old_rate:,.0f}/s)") if old_rate else "not run"
    print(f"| {step:,} | {new:.2f} | {old_txt} |", flush=True)


if __name__ == "__main__":
  app.run(main)
