"""The k-means palette: nearest-center tokens, decoding, fitting, and the .npy format."""

import numpy as np
import pytest

from igpt_jax import palette


def numpy_tokens(images, centers):
  x = images.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
  d = ((x[:, None, :] - centers[None].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(-1).reshape(images.shape[0], -1)


def random_palette(k, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, size=(k, 3)).astype(np.float32)


def test_quantize_is_nearest_center_like_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
  centers = random_palette(512)
  got = np.asarray(palette.quantize(images, centers))
  assert got.shape == (4, 64) and got.dtype == np.int32
  expected = numpy_tokens(images, centers)
  # float32 vs float64 may differ only on near-ties.
  assert (got == expected).mean() > 0.999


@pytest.mark.parametrize("kind", ["uniform", "duplicated", "gray"])
def test_lookup_table_equals_quantize(kind):
  """The input pipeline's color -> token table gives `quantize`'s tokens, ties included."""
  rng = np.random.default_rng(1)
  if kind == "uniform":
    centers = random_palette(512, seed=1)
  elif kind == "duplicated":  # exact ties: the lower index wins in both
    centers = np.repeat(random_palette(32, seed=1), 2, axis=0)
  else:  # clustered along the gray axis: many candidates per color cell
    centers = np.clip(np.repeat(np.linspace(-1, 1, 128)[:, None], 3, 1)
                      + rng.normal(0, 0.01, (128, 3)), -1, 1).astype(np.float32)
  table = palette.lookup_table(centers)
  assert table.shape == (1 << 24,) and table.dtype == np.int16
  colors = rng.integers(0, 256, size=(64, 1024, 1, 3), dtype=np.uint8)  # 65,536 random colors
  # Also every color within 2 levels of each center's own color (the near-tie regions).
  own = np.rint(127.5 * (centers + 1)).astype(int)
  near = np.clip(own[:, None] + np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3), -1).reshape(
      -1, 3), 0, 255).astype(np.uint8).reshape(len(centers), -1, 1, 3)
  for images in (colors, near):
    want = np.asarray(palette.quantize(images, centers))
    np.testing.assert_array_equal(palette.quantize_with_table(images, table), want)


@pytest.mark.slow
def test_lookup_table_equals_quantize_on_every_color():
  centers = random_palette(512, seed=3)
  table = palette.lookup_table(centers)
  allc = np.arange(1 << 24, dtype=np.int32)
  cube = np.stack([(allc >> 16) & 255, (allc >> 8) & 255, allc & 255], -1).astype(np.uint8)
  for s in range(0, 1 << 24, 1 << 20):
    chunk = cube[s:s + (1 << 20)].reshape(-1, 1024, 1, 3)
    np.testing.assert_array_equal(np.asarray(palette.quantize(chunk, centers)).reshape(-1),
                                  table[s:s + (1 << 20)])


def test_round_trip_of_palette_colors():
  centers = random_palette(64, seed=2)
  decoded = np.rint(127.5 * (centers + 1)).astype(np.uint8)  # the colors the palette encodes
  images = decoded.reshape(1, 8, 8, 3)
  tokens = np.asarray(palette.quantize(images, centers))
  np.testing.assert_array_equal(tokens[0], np.arange(64))
  np.testing.assert_array_equal(np.asarray(palette.dequantize(tokens, centers, 8)), images)


def test_grayscale_images_are_replicated_to_rgb():
  rng = np.random.default_rng(3)
  gray = rng.integers(0, 256, size=(2, 4, 4, 1), dtype=np.uint8)
  centers = random_palette(16, seed=3)
  np.testing.assert_array_equal(np.asarray(palette.quantize(gray, centers)),
                                np.asarray(palette.quantize(np.repeat(gray, 3, -1), centers)))
  out = np.asarray(palette.dequantize(np.zeros((2, 16), np.int32), centers, 4, channels=1))
  assert out.shape == (2, 4, 4, 1) and out.dtype == np.uint8
  with pytest.raises(ValueError, match="channel axis"):
    palette.quantize(rng.integers(0, 256, size=(2, 4, 4, 2), dtype=np.uint8), centers)


def test_kmeans_recovers_well_separated_colors():
  rng = np.random.default_rng(4)
  true = np.array([[20, 20, 20], [230, 30, 30], [30, 230, 30], [30, 30, 230], [240, 240, 240],
                   [128, 128, 0]], np.float32)
  pixels = np.clip(true[rng.integers(0, 6, 6000)] + rng.normal(0, 3, (6000, 3)), 0, 255)
  centers = palette.fit(pixels.astype(np.uint8), 6, seed=0, iterations=20)
  assert centers.shape == (6, 3) and centers.dtype == np.float32
  found = np.rint(127.5 * (centers + 1))
  d = np.abs(found[:, None] - true[None]).max(-1)
  assert sorted(d.argmin(1)) == list(range(6))  # one center per true color
  assert d.min(1).max() < 3.0


def test_lloyd_iterations_lower_the_distortion():
  rng = np.random.default_rng(5)
  pixels = rng.integers(0, 256, size=(5000, 3), dtype=np.uint8)

  def distortion(centers):
    x = pixels.astype(np.float64) / 127.5 - 1
    return ((x[:, None] - centers[None]) ** 2).sum(-1).min(-1).mean()

  assert distortion(palette.fit(pixels, 32, iterations=15)) < distortion(
      palette.fit(pixels, 32, iterations=0))


def test_save_load_and_openai_format(tmp_path):
  centers = random_palette(512, seed=6).astype(np.float64)  # OpenAI's file is float64-compatible
  path = str(tmp_path / "kmeans_centers.npy")
  np.save(path, centers)
  loaded = palette.load(path, 512)
  assert loaded.dtype == np.float32 and loaded.shape == (512, 3)
  palette.save(str(tmp_path / "p.npy"), loaded)
  np.testing.assert_array_equal(np.load(str(tmp_path / "p.npy")), loaded)


@pytest.mark.parametrize("array, match", [
    (np.zeros((256, 3), np.float32), r"shape \(256, 3\)"),
    (np.zeros((512, 4), np.float32), r"shape \(512, 4\)"),
    (np.zeros((512, 3), np.int64), "int64"),
    (np.full((512, 3), 5.0, np.float32), r"outside \[-1, 1\]"),
])
def test_bad_palette_files_are_named(tmp_path, array, match):
  path = str(tmp_path / "bad.npy")
  np.save(path, array)
  with pytest.raises(ValueError, match=match) as e:
    palette.load(path, 512)
  assert path in str(e.value)


def test_unreadable_palette_file(tmp_path):
  path = tmp_path / "broken.npy"
  path.write_bytes(b"not a numpy file")
  with pytest.raises(ValueError, match="cannot read palette file"):
    palette.load(str(path), 512)
