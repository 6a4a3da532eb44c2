"""Writing images: sample grids as PNG."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def grid(images: np.ndarray, cols: int | None = None, pad: int = 1) -> np.ndarray:
  """uint8 [n, h, w, c] -> one uint8 [H, W, c] image with the n images in rows of `cols`."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    out[y:y + h, x:x + w] = img
  return out


def save_png(path: str, image: np.ndarray, min_side: int = 256) -> None:
  """Saves uint8 [H, W, c], upscaled by an integer factor (nearest) to at least `min_side`."""
  image = np.asarray(image)
  scale = max(1, math.ceil(min_side / min(image.shape[:2])))
  if scale > 1:
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)
