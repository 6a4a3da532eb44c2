"""The reference for bench/input_pipeline.py: igpt_jax's training input before grain (commit
3477148), a tf.data pipeline over a TFRecord tfds dataset, kept only to be measured beside it.

It read the split through a shuffle buffer; a resume at step k skipped k x batch records
through that buffer (encoded, not decoded), so its start-up cost grew with the step.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

AUTOTUNE = tf.data.AUTOTUNE


def _decode(image):
  if image.dtype == tf.string:
    return tf.io.decode_image(image, channels=3, expand_animations=False)
  if image.shape[-1] == 1:
    return tf.image.grayscale_to_rgb(image)
  return image


def preprocess(image, *, image_size, crop_fraction, flip, seed):
  """Random square crop (a fraction of the short side), area resize, random flip."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short = tf.cast(tf.minimum(h, w), tf.float32)
  lo, hi = crop_fraction
  seeds = tf.random.experimental.stateless_split(seed, 4)
  frac = tf.random.stateless_uniform([], seeds[0], lo, hi)
  side = tf.maximum(tf.cast(tf.round(frac * short), tf.int32), 1)
  oy = tf.random.stateless_uniform([], seeds[1], 0, h - side + 1, dtype=tf.int32)
  ox = tf.random.stateless_uniform([], seeds[2], 0, w - side + 1, dtype=tf.int32)
  crop = image[oy:oy + side, ox:ox + side]
  out = tf.image.resize(tf.cast(crop, tf.float32), (image_size, image_size), method="area")
  out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
  if flip:
    out = tf.image.stateless_random_flip_left_right(out, seeds[3])
  return out


def quantize_tf(image, centers):
  x = tf.reshape(tf.cast(image, tf.float32) / 127.5 - 1.0, (-1, 1, 3))
  c = tf.constant(centers, tf.float32)
  d = ((x[..., 0] - c[:, 0]) ** 2 + (x[..., 1] - c[:, 1]) ** 2 + (x[..., 2] - c[:, 2]) ** 2)
  return tf.cast(tf.argmin(d, axis=-1), tf.int32)


def train_iterator(builder, split: str, centers, *, image_size: int, crop_fraction, flip: bool,
                   local_batch: int, seed: int, skip_batches: int = 0,
                   shuffle_buffer: int = 16_384, cache: bool = True):
  """The old `input_pipeline.train_iterator` for one process (input_order "global")."""
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  read_config = tfds.ReadConfig(shuffle_seed=seed, try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})
  if cache:
    ds = ds.cache()
  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed).enumerate()
  ds = ds.skip(skip_batches * local_batch)

  def process(index, ex):
    example_seed = tf.stack([tf.cast(seed, tf.int64), index])
    image = preprocess(_decode(ex["image"]), image_size=image_size,
                       crop_fraction=crop_fraction, flip=flip, seed=example_seed)
    return {"tokens": quantize_tf(image, centers), "label": tf.cast(ex["label"], tf.int32)}

  ds = ds.map(process, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE).with_options(options)
  return ds.as_numpy_iterator()
