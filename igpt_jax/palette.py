"""The k-means color palette ("9-bit color") that turns RGB pixels into tokens.

Pixels are scaled to [-1, 1] (`px / 127.5 - 1`) as in OpenAI's release; a palette is a
`(k, 3)` float32 array of centers in that space, saved as `.npy` exactly like the released
`kmeans_centers.npy` (so that file loads too). A pixel's token is its nearest center by squared
Euclidean distance; a token decodes to `rint(127.5 * (center + 1))`.
"""

from __future__ import annotations

import functools
import os

import einops
import jax
import jax.numpy as jnp
import numpy as np

from igpt_jax import errors


class PaletteError(errors.UserError, ValueError):
  """A palette file or fit cannot work; the message says why and what to do."""


def to_unit(pixels):
  """uint8-range pixels -> [-1, 1] float32."""
  return pixels.astype(jnp.float32) / 127.5 - 1.0


def as_rgb(images):
  """Accepts [..., H, W, 3] RGB, [..., H, W, 1] grayscale; grayscale is replicated to RGB."""
  if images.shape[-1] == 3:
    return images
  if images.shape[-1] == 1:
    return jnp.repeat(images, 3, axis=-1)
  raise ValueError(
      f"images must end in a channel axis of 1 (grayscale) or 3 (RGB); got shape "
      f"{tuple(images.shape)}. Add a channel axis to 2-D grayscale images (x[..., None]).")


def _channel_sum_sq(x, c):
  """Squared distance of broadcastable [..., 3] arrays, summed channel by channel."""
  return (x[..., 0] - c[..., 0]) ** 2 + (x[..., 1] - c[..., 1]) ** 2 + (x[..., 2] - c[..., 2]) ** 2


def squared_distances(x, centers):
  """x [..., 3], centers [k, 3] -> [..., k], summed channel by channel (exact, no |x|^2 trick)."""
  return _channel_sum_sq(x[..., None, :], centers)


@jax.jit
def quantize(images, centers):
  """images [..., H, W, C] (uint8 range, C in {1, 3}) -> tokens [..., H*W] int32."""
  rgb = to_unit(as_rgb(images))
  flat = einops.rearrange(rgb, "... h w c -> ... (h w) c")  # raster order
  return jnp.argmin(squared_distances(flat, centers), axis=-1).astype(jnp.int32)


# The lookup table: every 24-bit RGB color's token, for the host input pipeline (an array index
# per pixel instead of k distances). Built cell by cell over 16x16x16 blocks of the color cube:
# a center whose nearest point in a block is farther than some center's farthest point cannot
# be the nearest center of any color in it, so only the remaining candidates are compared, with
# the same float32 arithmetic as `quantize`; the table equals `quantize` on all 2^24 colors.
_CELL = 16
_CELLS = 256 // _CELL


def _candidates(cells, centers):
  """bool [n, k]: the centers that can be nearest to some color of each cell [n, 3]."""
  lo = to_unit(cells * _CELL)[:, None]  # [n, 1, 3] the cell's corners in [-1, 1]
  hi = to_unit(cells * _CELL + _CELL - 1)[:, None]
  c = centers[None]  # [1, k, 3]
  near = jnp.sum(jnp.square(jnp.maximum(jnp.maximum(lo - c, c - hi), 0)), -1)  # [n, k]
  far = jnp.sum(jnp.maximum(jnp.square(c - lo), jnp.square(c - hi)), -1)
  # A margin far above float32 rounding keeps every center that could tie or win.
  return near <= jnp.min(far, axis=-1, keepdims=True) + 1e-4


@functools.partial(jax.jit, static_argnames=("num_candidates",))
def _cell_tokens(cells, centers, num_candidates: int):
  """cells int32 [n, 3] (cell coordinates) -> int32 tokens [n, 16^3] of the colors in them."""
  candidate = _candidates(cells, centers)  # [n, k]
  # Candidates first, in ascending index order, so argmin breaks ties as `quantize` does.
  order = jnp.argsort(~candidate, axis=-1, stable=True)[:, :num_candidates]  # [n, K]
  offsets = jnp.arange(_CELL**3)
  local = jnp.stack([offsets // _CELL**2, offsets // _CELL % _CELL, offsets % _CELL], -1)
  rgb = cells[:, None, :] * _CELL + local[None]  # [n, 16^3, 3]
  d = _channel_sum_sq(to_unit(rgb)[:, :, None, :], centers[order][:, None])  # [n, 16^3, K]
  best = jnp.argmin(d, axis=-1)  # [n, 16^3]
  return jnp.take_along_axis(order, best, axis=-1)


@jax.jit
def _candidate_counts(cells, centers):
  return jnp.sum(_candidates(cells, centers), axis=-1)


def lookup_table(centers) -> np.ndarray:
  """int16 [2^24]: the token of RGB color (r << 16 | g << 8 | b), exactly `quantize`'s."""
  # Explicit copies both ways (it runs once, while the input pipeline starts).
  centers = jax.device_put(np.asarray(centers, np.float32))
  grid = np.stack(np.meshgrid(*[np.arange(_CELLS)] * 3, indexing="ij"), -1).reshape(-1, 3)
  grid = grid.astype(np.int32)
  k = int(np.max(jax.device_get(_candidate_counts(jax.device_put(grid), centers))))
  k = 1 << max(k - 1, 0).bit_length()  # a power of two: few distinct compilations
  chunk = max(1, (1 << 22) // (_CELL**3 * k))  # cells per call: ~4M distances at a time
  tokens = np.concatenate([jax.device_get(_cell_tokens(jax.device_put(grid[i:i + chunk]),
                                                       centers, k))
                           for i in range(0, len(grid), chunk)])  # [cells, 16^3]
  # Cell (R, G, B) and offset (r, g, b) -> color (16R + r, 16G + g, 16B + b), raster order.
  table = einops.rearrange(tokens, "(R G B) (r g b) -> (R r G g B b)", R=_CELLS, G=_CELLS,
                           r=_CELL, g=_CELL)
  return table.astype(np.int16)


def quantize_with_table(images: np.ndarray, table: np.ndarray) -> np.ndarray:
  """uint8 RGB images [..., H, W, 3] -> int32 tokens [..., H*W] through `lookup_table`."""
  x = images.astype(np.int32)
  codes = (x[..., 0] << 16) | (x[..., 1] << 8) | x[..., 2]
  return table[einops.rearrange(codes, "... h w -> ... (h w)")].astype(np.int32)


@functools.partial(jax.jit, static_argnames=("image_size", "channels"))
def dequantize(tokens, centers, image_size: int, channels: int = 3):
  """tokens [..., H*W] -> uint8 images [..., H, W, channels] (channels 1 gives luma)."""
  rgb = jnp.rint(127.5 * (centers[tokens] + 1.0))
  rgb = einops.rearrange(rgb, "... (h w) c -> ... h w c", h=image_size)
  if channels == 1:
    luma = jnp.matmul(rgb, jnp.array([0.299, 0.587, 0.114]), precision=jax.lax.Precision.HIGHEST)
    rgb = jnp.rint(luma)[..., None]
  return jnp.clip(rgb, 0, 255).astype(jnp.uint8)


def _kmeans_pp_init(key, x, k):
  """k-means++ seeding: each new center drawn with probability proportional to D(x)^2."""
  n = x.shape[0]
  key, first = jax.random.split(key)
  centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[jax.random.randint(first, (), 0, n)])
  d2 = jnp.sum(jnp.square(x - centers[0]), axis=-1)

  def body(i, carry):
    centers, d2, key = carry
    key, sub = jax.random.split(key)
    # A tiny floor keeps the draw defined when fewer than k distinct pixels exist.
    logits = jnp.log(d2 + 1e-12)
    c = x[jax.random.categorical(sub, logits)]
    centers = centers.at[i].set(c)
    d2 = jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=-1))
    return centers, d2, key

  centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, d2, key))
  return centers


def _assign(x, centers):
  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; the |x|^2 term does not change the argmin. Full float32
  # whatever the platform's default (TF32 on GPUs, bfloat16 passes on TPUs) or the run's
  # model.matmul_precision: the palette must not depend on where it was fitted.
  xc = jnp.matmul(x, centers.T, precision=jax.lax.Precision.HIGHEST)
  d = -2.0 * xc + jnp.sum(jnp.square(centers), axis=-1)
  return jnp.argmin(d, axis=-1)


@functools.partial(jax.jit, static_argnames=("k", "iterations"))
def _kmeans(key, x, k: int, iterations: int):
  centers = _kmeans_pp_init(key, x, k)

  def lloyd(_, centers):
    assign = _assign(x, centers)
    sums = jax.ops.segment_sum(x, assign, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones(x.shape[0], x.dtype), assign, num_segments=k)
    # An empty cluster keeps its previous center.
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centers)

  return jax.lax.fori_loop(0, iterations, lloyd, centers)


def fit(pixels, k: int, *, seed: int = 0, iterations: int = 30):
  """Fits a k-color palette to RGB pixels [N, 3] (uint8 range). Returns (k, 3) float32."""
  pixels = np.asarray(pixels).reshape(-1, 3)
  if pixels.shape[0] < k:
    raise PaletteError(f"a {k}-color palette needs at least {k} pixels to fit; got "
                       f"{pixels.shape[0]}. Lower config.palette_size, raise "
                       "config.palette_fit_pixels / palette_fit_images, or use more images.")
  centers = _kmeans(jax.random.PRNGKey(seed), to_unit(jnp.asarray(pixels)), k, iterations)
  return np.asarray(centers, np.float32)


def path_for(config, workdir: str) -> str:
  """Where a run's palette is: config.palette_path if set, else workdir/palette.npy."""
  return config.get("palette_path", "") or os.path.join(workdir, "palette.npy")


def load_for_run(config, workdir: str) -> np.ndarray:
  """The palette of the run in `workdir`; a missing one means there is no trained run."""
  path = path_for(config, workdir)
  if not os.path.exists(path):
    raise errors.MissingError(f"no palette at {path}: {workdir} holds no trained run. Train "
                              "first (python -m igpt_jax.main), fix --workdir, or set "
                              "config.palette_path.")
  return load(path, config.palette_size)


def load(path: str, k: int) -> np.ndarray:
  """Loads a (k, 3) palette .npy (ours or OpenAI's kmeans_centers.npy), checking its shape."""
  try:
    centers = np.load(path)
  except (OSError, ValueError) as e:
    raise PaletteError(f"cannot read palette file {path}: {e}. Delete it to refit, or set "
                     "config.palette_path to a valid (k, 3) .npy file.") from e
  if centers.ndim != 2 or centers.shape != (k, 3) or not np.issubdtype(centers.dtype,
                                                                       np.floating):
    raise PaletteError(
        f"palette file {path} holds a {centers.dtype} array of shape {centers.shape}; "
        f"config.palette_size={k} needs a float array of shape ({k}, 3) with values in "
        "[-1, 1]. Fix config.palette_size or point config.palette_path at a matching file.")
  if not np.all(np.isfinite(centers)) or np.abs(centers).max() > 1.0 + 1e-6:
    raise PaletteError(f"palette file {path} has values outside [-1, 1] (pixels are scaled "
                     "with px / 127.5 - 1); it is not an iGPT palette.")
  return centers.astype(np.float32)


def save(path: str, centers: np.ndarray) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npy"
  np.save(tmp, np.asarray(centers, np.float32))
  os.replace(tmp, path)
