"""Weight import/export: logits parity with transformers' ImageGPT, palette parity with its
image processor on real CIFAR-10, OpenAI's TF checkpoint layout, and the CLI."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import run_tool
from igpt_jax import weights  # pylint: disable=wrong-import-position
from igpt_jax import palette as palette_lib  # pylint: disable=wrong-import-position

SHAPES = [  # (layers, width, heads, image side)
    (2, 64, 4, 8),
    (3, 96, 6, 12),
    (1, 128, 8, 16),
]


def random_hf_model(layers, width, heads, side, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.ImageGPTConfig(vocab_size=513, n_positions=side * side, n_embd=width,
                                    n_layer=layers, n_head=heads)
  model = transformers.ImageGPTForCausalImageModeling(cfg).eval()
  with torch.no_grad():  # the released weights have zero biases; give every weight some scale
    for name, p in model.named_parameters():
      if name.endswith(".bias"):
        p.zero_()
      elif "ln_" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens):
  sos = model.config.vocab_size - 1
  ids = np.concatenate([np.full((len(tokens), 1), sos), tokens[:, :-1]], axis=1)
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits
  return out.numpy()[..., :sos]


def save_hf(model, palette, path):
  model.save_pretrained(path, safe_serialization=True)
  processor = transformers.ImageGPTImageProcessor(clusters=palette)
  processor.save_pretrained(path)


@pytest.mark.parametrize("layers, width, heads, side", SHAPES)
def test_hf_import_logits_match_pytorch(layers, width, heads, side, tmp_path):
  model = random_hf_model(layers, width, heads, side)
  palette = np.random.default_rng(0).uniform(-1, 1, (512, 3)).astype(np.float32)
  save_hf(model, palette, tmp_path / "hf")
  weights.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  logits, centers = weights.logits_fn(str(tmp_path / "run"))
  np.testing.assert_array_equal(centers, palette)
  tokens = np.random.default_rng(1).integers(0, 512, (3, side * side))
  ours, theirs = logits(tokens), hf_logits(model, tokens)
  assert ours.shape == theirs.shape == (3, side * side, 512)
  assert np.abs(theirs).max() > 1.0  # not a trivially small comparison
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_export_to_hf_round_trips(tmp_path):
  model = random_hf_model(2, 64, 4, 8, seed=3)
  palette = np.random.default_rng(2).uniform(-1, 1, (512, 3)).astype(np.float32)
  save_hf(model, palette, tmp_path / "hf")
  weights.import_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
  out = run_tool("convert", "--to=hf", f"--workdir={tmp_path / 'run'}",
                 f"--output={tmp_path / 'back'}")
  assert out.returncode == 0, out.stderr[-3000:]
  back = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "back").eval()
  tokens = np.random.default_rng(4).integers(0, 512, (2, 64))
  np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(model, tokens), atol=1e-5)
  processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "back")
  np.testing.assert_allclose(np.asarray(processor.clusters), palette, atol=1e-6)


def test_palette_quantisation_matches_the_image_processor_on_cifar10(cifar10_dir):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  files = sorted(os.path.join(root, f) for root, _, fs in os.walk(
      os.path.join(cifar10_dir, "test")) for f in fs)[::250][:40]
  images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
  assert images.shape == (40, 32, 32, 3)
  centers = palette_lib.fit(images.reshape(-1, 3), 512, seed=0, iterations=5)
  processor = transformers.ImageGPTImageProcessor(clusters=np.asarray(centers),
                                                  size={"height": 32, "width": 32})
  theirs = processor(images=list(images), return_tensors="np")["input_ids"]
  ours = np.asarray(palette_lib.quantize(images, centers))
  assert ours.shape == theirs.shape == (40, 1024)
  np.testing.assert_array_equal(ours, theirs)


def test_openai_checkpoint_layout(tmp_path):
  """A TF checkpoint with the released variable names (conv1d weights [1, nx, nf], q/k/v
  projections, `g` gains), written from a transformers model, imports to the same logits."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = random_hf_model(2, 64, 4, 8, seed=5)
  ours = weights.from_hf_state({k: v.numpy() for k, v in model.state_dict().items()},
                               num_layers=2, num_heads=4)
  d = 64
  variables = {"model/wte": ours["wte"], "model/wpe": ours["wpe"], "model/sos": ours["sos"],
               "model/ln_f/g": ours["ln_f"]["scale"], "model/wtet": ours["wtet"],
               "model/h0/attn/q_proj/w/Adam": np.zeros((1, d, d), np.float32)}  # ignored
  b = ours["blocks"]
  for i in range(2):
    h = f"model/h{i}/"
    for n, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      variables[h + f"attn/{name}/w"] = b["attn"][n][i].reshape(1, d, d)
    variables[h + "attn/c_proj/w"] = b["attn"]["out"][i].reshape(1, d, d)
    variables[h + "mlp/c_fc/w"] = b["mlp"]["fc"]["kernel"][i][None]
    variables[h + "mlp/c_proj/w"] = b["mlp"]["proj"]["kernel"][i][None]
    variables[h + "ln_1/g"] = b["ln_1"]["scale"][i]
    variables[h + "ln_2/g"] = b["ln_2"]["scale"][i]
  graph = tf.Graph()
  with graph.as_default():
    tf_vars = [tf.compat.v1.get_variable(k, initializer=tf.constant(v))
               for k, v in variables.items()]
    saver = tf.compat.v1.train.Saver(tf_vars)
    with tf.compat.v1.Session() as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      prefix = saver.save(sess, str(tmp_path / "model.ckpt"))
  palette = np.random.default_rng(6).uniform(-1, 1, (512, 3)).astype(np.float32)
  np.save(tmp_path / "kmeans_centers.npy", palette)
  out = run_tool("convert", "--source=openai", f"--input={prefix}",
                 f"--palette={tmp_path / 'kmeans_centers.npy'}", "--num_heads=4",
                 f"--workdir={tmp_path / 'run'}")
  assert out.returncode == 0, out.stderr[-3000:]
  logits, centers = weights.logits_fn(str(tmp_path / "run"))
  np.testing.assert_array_equal(centers, palette)
  tokens = np.random.default_rng(7).integers(0, 512, (2, 64))
  np.testing.assert_allclose(logits(tokens), hf_logits(model, tokens), atol=1e-4)
  with open(tmp_path / "run" / "config.json") as f:
    saved = json.load(f)
  assert (saved["image_size"], saved["model"]["num_layers"], saved["model"]["width"]) == (8, 2, 64)


def test_conversion_errors_are_clear(tmp_path):
  model = random_hf_model(1, 64, 4, 8)
  with torch.no_grad():
    model.transformer.h[0].mlp.c_fc.bias.fill_(0.5)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  with pytest.raises(weights.ConversionError, match="mlp.c_fc.bias is not zero"):
    weights.from_hf_state(state, num_layers=1, num_heads=4)
  with pytest.raises(weights.ConversionError, match="no config.json"):
    weights.import_hf(str(tmp_path), str(tmp_path / "run"))
  out = run_tool("convert", "--source=openai", f"--input={tmp_path / 'missing'}",
                 "--palette=x.npy", f"--workdir={tmp_path / 'run'}", timeout=120)
  assert out.returncode == 2 and "cannot read a TF checkpoint" in out.stderr
  assert "Traceback" not in out.stderr
