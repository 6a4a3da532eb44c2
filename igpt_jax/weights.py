r"""iGPT weights in other formats: OpenAI's released TF checkpoints and transformers' ImageGPT
in, transformers' format out (the library behind `python -m igpt_jax.convert`).

Importing writes a run directory: OUT/checkpoints/0 (an orbax train state with a fresh optimizer
state), OUT/palette.npy and OUT/config.json, which `evaluate`, `sample` and `main` (fine-tuning
from it) use unchanged with `--config=OUT/config.py`, also written. `hf` reads a
`save_pretrained` directory (config.json, model.safetensors or pytorch_model.bin, and
preprocessor_config.json's `clusters` when present); `openai` reads the original TF checkpoint
(variables `model/wte`, `model/h0/attn/q_proj/w`, ...) with TensorFlow's checkpoint reader, and
the palette from kmeans_centers.npy.

Parameter correspondences (ours <- transformers):
  wte [512, d] <- transformer.wte.weight[:512]; sos [d] <- transformer.wte.weight[512]
  wpe <- transformer.wpe.weight; ln_f.scale <- transformer.ln_f.weight; wtet <- lm_head.weight
  blocks.ln_1/ln_2.scale [L, d] <- h.{i}.ln_1/ln_2.weight
  blocks.attn.query/key/value [L, d, heads, head_dim] <- h.{i}.attn.c_attn.weight [d, 3d] split
  blocks.attn.out [L, heads, head_dim, d] <- h.{i}.attn.c_proj.weight [d, d]
  blocks.mlp.fc.kernel [L, d, 4d] <- h.{i}.mlp.c_fc.weight; mlp.proj.kernel <- mlp.c_proj.weight
iGPT has no biases; transformers' bias tensors must be zero (they are for the released weights)
or the import refuses, since the model here cannot represent them.
"""

from __future__ import annotations

import json
import os
import time

import jax
import ml_collections
import numpy as np

from igpt_jax import atomic
from igpt_jax import checkpointing
from igpt_jax import config_lib
from igpt_jax import errors
from igpt_jax import palette as palette_lib
from igpt_jax import run as run_lib
from igpt_jax import sharding
from igpt_jax import train_state


class ConversionError(errors.UserError, ValueError):
  """The input cannot be converted; the message says why and what to do."""


# --- transformers' ImageGPT <-> our parameter tree -----------------------------------------

def from_hf_state(state: dict, *, num_layers: int, num_heads: int) -> dict:
  """transformers ImageGPT state dict (numpy arrays) -> our float32 params (numpy)."""
  get = lambda k: np.asarray(state[k], np.float32)
  for key, value in state.items():
    if key.endswith(".bias") and np.any(np.asarray(value) != 0):
      raise ConversionError(
          f"{key} is not zero: iGPT has no biases (the released weights' are all zero), so this "
          "model cannot be represented exactly here.")
  wte = get("transformer.wte.weight")
  vocab = wte.shape[0] - 1  # the last row is the start-of-sequence token
  d = wte.shape[1]
  hd = d // num_heads
  stack = lambda f: np.stack([f(i) for i in range(num_layers)])
  p = lambda i, name: get(f"transformer.h.{i}.{name}")
  c_attn = stack(lambda i: p(i, "attn.c_attn.weight"))  # [L, d, 3d]
  q, k, v = (c_attn[:, :, j * d:(j + 1) * d].reshape(num_layers, d, num_heads, hd)
             for j in range(3))
  lm_head = state.get("lm_head.weight")
  if lm_head is None:
    raise ConversionError("the state has no lm_head.weight: export ImageGPTForCausalImageModeling "
                          "(not ImageGPTModel) so that the output head comes along.")
  return {
      "wte": wte[:vocab], "sos": wte[vocab], "wpe": get("transformer.wpe.weight"),
      "blocks": {
          "ln_1": {"scale": stack(lambda i: p(i, "ln_1.weight"))},
          "ln_2": {"scale": stack(lambda i: p(i, "ln_2.weight"))},
          "attn": {"query": q, "key": k, "value": v,
                   "out": stack(lambda i: p(i, "attn.c_proj.weight")).reshape(
                       num_layers, num_heads, hd, d)},
          "mlp": {"fc": {"kernel": stack(lambda i: p(i, "mlp.c_fc.weight"))},
                  "proj": {"kernel": stack(lambda i: p(i, "mlp.c_proj.weight"))}},
      },
      "ln_f": {"scale": get("transformer.ln_f.weight")},
      "wtet": np.asarray(lm_head, np.float32),
  }


def to_hf_state(params) -> dict:
  """Our params -> transformers ImageGPTForCausalImageModeling state dict (numpy float32)."""
  params = _to_numpy(params)
  b = params["blocks"]
  num_layers, d, num_heads, hd = b["attn"]["query"].shape
  state = {
      "transformer.wte.weight": np.concatenate([params["wte"], params["sos"][None]]),
      "transformer.wpe.weight": params["wpe"],
      "transformer.ln_f.weight": params["ln_f"]["scale"],
      "lm_head.weight": params["wtet"],
  }
  for i in range(num_layers):
    pre = f"transformer.h.{i}."
    qkv = np.concatenate([b["attn"][n][i].reshape(d, d) for n in ("query", "key", "value")], 1)
    fc, proj = b["mlp"]["fc"]["kernel"][i], b["mlp"]["proj"]["kernel"][i]
    state.update({
        pre + "ln_1.weight": b["ln_1"]["scale"][i], pre + "ln_2.weight": b["ln_2"]["scale"][i],
        pre + "attn.c_attn.weight": qkv, pre + "attn.c_attn.bias": np.zeros(3 * d, np.float32),
        pre + "attn.c_proj.weight": b["attn"]["out"][i].reshape(d, d),
        pre + "attn.c_proj.bias": np.zeros(d, np.float32),
        pre + "mlp.c_fc.weight": fc, pre + "mlp.c_fc.bias": np.zeros(fc.shape[1], np.float32),
        pre + "mlp.c_proj.weight": proj, pre + "mlp.c_proj.bias": np.zeros(d, np.float32),
    })
  return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


def hf_config_dict(params, num_heads: int) -> dict:
  """The transformers ImageGPTConfig fields of a model with these params."""
  params = _to_numpy(params)
  vocab, d = params["wte"].shape
  return {"model_type": "imagegpt", "architectures": ["ImageGPTForCausalImageModeling"],
          "vocab_size": vocab + 1, "n_positions": params["wpe"].shape[0], "n_embd": d,
          "n_layer": params["blocks"]["ln_1"]["scale"].shape[0], "n_head": num_heads,
          "n_inner": None, "activation_function": "quick_gelu", "layer_norm_epsilon": 1e-5,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": False,
          "scale_attn_weights": True, "initializer_range": 0.02}


# --- OpenAI's TF checkpoints -----------------------------------------------------------------

def from_openai_variables(get, *, num_layers: int, num_heads: int) -> dict:
  """`get(name)` -> numpy array of a variable of the released TF checkpoint -> our params."""
  f = lambda name: np.asarray(get(name), np.float32)
  squeeze = lambda w: w.reshape(w.shape[-2], w.shape[-1])  # conv1d weights are [1, nx, nf]
  wte = f("model/wte")
  d = wte.shape[1]
  hd = d // num_heads
  stack = lambda fn: np.stack([fn(i) for i in range(num_layers)])
  h = lambda i, name: f(f"model/h{i}/{name}")
  heads = lambda name: stack(lambda i: squeeze(h(i, f"attn/{name}/w"))).reshape(
      num_layers, d, num_heads, hd)
  return {
      "wte": wte, "sos": f("model/sos").reshape(d), "wpe": f("model/wpe"),
      "blocks": {
          "ln_1": {"scale": stack(lambda i: h(i, "ln_1/g"))},
          "ln_2": {"scale": stack(lambda i: h(i, "ln_2/g"))},
          "attn": {"query": heads("q_proj"), "key": heads("k_proj"), "value": heads("v_proj"),
                   "out": stack(lambda i: squeeze(h(i, "attn/c_proj/w"))).reshape(
                       num_layers, num_heads, hd, d)},
          "mlp": {"fc": {"kernel": stack(lambda i: squeeze(h(i, "mlp/c_fc/w")))},
                  "proj": {"kernel": stack(lambda i: squeeze(h(i, "mlp/c_proj/w")))}},
      },
      "ln_f": {"scale": f("model/ln_f/g")},
      "wtet": f("model/wtet"),
  }


def read_openai_checkpoint(prefix: str):
  """(get(name), {name: shape}) over a TF checkpoint, with only TensorFlow's reader."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    reader = tf.train.load_checkpoint(prefix)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"cannot read a TF checkpoint at {prefix!r} ({e}); pass the prefix "
                          "(e.g. .../model.ckpt-1000000, without .index).") from e
  shapes = reader.get_variable_to_shape_map()
  return reader.get_tensor, shapes


def openai_shape(shapes: dict) -> tuple[int, int]:
  """(num_layers, width) of a released checkpoint from its variable shapes."""
  if "model/wte" not in shapes:
    raise ConversionError("the checkpoint has no model/wte: it is not an iGPT checkpoint.")
  layers = {int(n.split("/")[1][1:]) for n in shapes if n.startswith("model/h")}
  return len(layers), shapes["model/wte"][1]


# --- writing a run directory -----------------------------------------------------------------

def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


HEADS_BY_WIDTH = {512: 8, 1024: 8, 1536: 16}  # iGPT-S, M, L (the released models)


def config_for(params: dict, num_heads: int, base=None):
  """An experiment config whose model shape is that of `params`."""
  c = base or config_lib.imagenet_config()
  vocab, d = params["wte"].shape
  seq_len = params["wpe"].shape[0]
  side = int(round(seq_len**0.5))
  if side * side != seq_len:
    raise ConversionError(f"{seq_len} positions is not a square image.")
  c.image_size, c.palette_size = side, vocab
  config_lib.igpt_size(c, num_layers=params["blocks"]["ln_1"]["scale"].shape[0], width=d,
                       num_heads=num_heads)
  return c


RUN_FILES = ("checkpoints", "palette.npy", "config.json", "config.py")


def _set_aside_run(workdir: str, overwrite: bool) -> None:
  """Refuses a `workdir` that holds a run (any of RUN_FILES, an empty checkpoints/ aside), or
  with `overwrite` moves those files into workdir/replaced.<time>/."""
  held = [f for f in RUN_FILES if os.path.exists(os.path.join(workdir, f))]
  checkpoints = os.path.join(workdir, "checkpoints")
  if held == ["checkpoints"] and not os.listdir(checkpoints):
    held = []
  if not held:
    return
  if not overwrite:
    raise ConversionError(f"{workdir} holds a run ({', '.join(held)}); convert into a new "
                          "--workdir, or pass --overwrite to replace it (its files are moved "
                          "to replaced.<time>/ inside it). Nothing there was touched.")
  aside = os.path.join(workdir, f"replaced.{int(time.time())}")
  os.makedirs(aside)
  for f in held:
    os.replace(os.path.join(workdir, f), os.path.join(aside, f))


def write_run(workdir: str, params: dict, palette: np.ndarray, config, *,
              overwrite: bool = False) -> str:
  """Writes checkpoints/0 (params + fresh optimizer state), palette.npy, config.json/.py into a
  `workdir` that holds no run (`overwrite`: one that does, its files set aside first)."""
  _set_aside_run(workdir, overwrite)
  os.makedirs(workdir, exist_ok=True)
  palette = np.asarray(palette, np.float32)
  if palette.shape != (config.palette_size, 3):
    raise ConversionError(f"the palette has shape {palette.shape}; the model needs "
                          f"({config.palette_size}, 3).")
  palette_lib.save(os.path.join(workdir, "palette.npy"), palette)
  config.palette_path = ""
  _, tx, fresh, shardings = _model_state(config)
  shapes = jax.tree_util.tree_map(lambda x: x.shape, fresh.params)
  got = jax.tree_util.tree_map(lambda x: x.shape, params)
  if shapes != got:
    raise ConversionError(f"converted parameter shapes {got} do not match the model {shapes}.")
  params = jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
                                  params, shardings.params)
  state = fresh.replace(params=params, opt_state=tx.init(params))
  checkpointing.save_config(workdir, config)
  with open(os.path.join(workdir, "config.py"), "w") as f:
    f.write(CONFIG_PY.format(json=os.path.join(os.path.abspath(workdir), "config.json")))
  mgr = checkpointing.manager(workdir, config)
  checkpointing.save(mgr, 0, state, next_index=0)
  mgr.wait_until_finished()
  mgr.close()
  return workdir


def _model_state(config):
  """(model, optimizer, fresh train state, shardings) of `config`, without opening its data."""
  config_lib.validate(config, jax.device_count())
  model, _, tx = train_state.model_and_optimizer(config, train_state.warmup_steps(config))
  state, shardings = train_state.create_train_state(model, tx, sharding.make_mesh(config),
                                                    config, config.seed)
  return model, tx, state, shardings


def _params_and_model(workdir: str, config):
  """(params, step, model) of the latest checkpoint in `workdir`; no optimizer state is built
  and the dataset is not opened."""
  run = run_lib.Run(config, workdir)
  params, step = run.latest_params()
  return params, step, run.model


CONFIG_PY = '''"""The config of a converted model (written by igpt_jax.convert)."""

import json

import ml_collections

from igpt_jax import config_lib


def get_config():
  # The saved fields over today's defaults, so fields added later get their defaults.
  config = config_lib.base_config()
  with open({json!r}) as f:
    config.update(ml_collections.ConfigDict(json.load(f)))
  return config
'''


def import_hf(input_dir: str, workdir: str, base_config=None, *, overwrite: bool = False) -> str:
  """A transformers `save_pretrained` directory -> a run directory here."""
  hf_cfg = _read_hf_config(input_dir)
  state = _read_hf_weights(input_dir)
  try:
    params = from_hf_state(state, num_layers=hf_cfg["n_layer"], num_heads=hf_cfg["n_head"])
  except KeyError as e:
    raise ConversionError(f"{input_dir}: the weights have no tensor {e.args[0]!r}, which an "
                          f"ImageGPT model of {hf_cfg['n_layer']} layers has: the weights do "
                          "not match config.json, or are not ImageGPT's.") from e
  palette = _read_hf_palette(input_dir, params["wte"].shape[0])
  config = config_for(params, hf_cfg["n_head"], base_config)
  return write_run(workdir, params, palette, config, overwrite=overwrite)


def _read_hf_config(input_dir: str) -> dict:
  """config.json of a transformers ImageGPT model, checked for what the import needs."""
  cfg_path = os.path.join(input_dir, "config.json")
  if not os.path.exists(cfg_path):
    raise ConversionError(f"{input_dir} has no config.json: pass a directory written by "
                          "ImageGPTForCausalImageModeling.save_pretrained.")
  try:
    with open(cfg_path) as f:
      hf_cfg = json.load(f)
  except ValueError as e:
    raise ConversionError(f"{cfg_path} is not valid JSON ({e}).") from e
  if not isinstance(hf_cfg, dict) or hf_cfg.get("model_type", "imagegpt") != "imagegpt":
    kind = hf_cfg.get("model_type") if isinstance(hf_cfg, dict) else type(hf_cfg).__name__
    raise ConversionError(f"{cfg_path} describes a {kind!r} model; only ImageGPT "
                          "(model_type 'imagegpt') converts to iGPT.")
  for field in ("n_layer", "n_head", "n_embd"):
    value = hf_cfg.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConversionError(f"{cfg_path}: {field}={value!r}; an ImageGPT config.json gives "
                            f"n_layer, n_head and n_embd as positive integers.")
  if hf_cfg["n_embd"] % hf_cfg["n_head"]:
    raise ConversionError(f"{cfg_path}: n_head={hf_cfg['n_head']} does not divide "
                          f"n_embd={hf_cfg['n_embd']}, so the heads have no whole width.")
  return hf_cfg


def _read_hf_weights(input_dir: str) -> dict:
  st = os.path.join(input_dir, "model.safetensors")
  if os.path.exists(st):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return load_file(st)
    except Exception as e:  # pylint: disable=broad-except  # safetensors' own error types
      raise ConversionError(f"{st} cannot be read as safetensors ({str(e)[:200]}): the file "
                            "is damaged or not a safetensors file; save the model again.") from e
  binf = os.path.join(input_dir, "pytorch_model.bin")
  if os.path.exists(binf):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(f"{binf} needs PyTorch to read; install torch, or save the model "
                            "with safe_serialization=True.") from e
    return {k: v.float().numpy() for k, v in torch.load(binf, map_location="cpu").items()}
  raise ConversionError(f"{input_dir} has neither model.safetensors nor pytorch_model.bin.")


def _read_hf_palette(input_dir: str, k: int) -> np.ndarray:
  path = os.path.join(input_dir, "preprocessor_config.json")
  if not os.path.exists(path):
    raise ConversionError(f"{input_dir} has no preprocessor_config.json with the palette "
                          "(`clusters`); save the ImageGPTImageProcessor beside the model.")
  with open(path) as f:
    clusters = json.load(f).get("clusters")
  if clusters is None:
    raise ConversionError(f"{path} has no `clusters` (the {k}-color palette).")
  return checked_palette(clusters, k, path)


def checked_palette_file(path: str, k: int) -> np.ndarray:
  """A released palette file (kmeans_centers.npy) as a checked [k, 3] float32 array."""
  if not os.path.exists(path):
    raise errors.MissingError(f"--palette={path} does not exist: pass the released "
                              "kmeans_centers.npy.")
  try:
    values = np.load(path, allow_pickle=False)
  except ValueError as e:
    raise ConversionError(f"--palette={path} is not a plain .npy array ({str(e)[:120]}); pass "
                          "the released kmeans_centers.npy.") from e
  return checked_palette(values, k, f"--palette={path}")


def checked_palette(values, k: int, where: str) -> np.ndarray:
  """`values` as a float32 [k, 3] palette, or a ConversionError saying what is wrong."""
  try:
    palette = np.asarray(values, np.float32)
  except (ValueError, TypeError) as e:
    raise ConversionError(f"{where}: the palette is not a rectangular array of numbers "
                          f"({str(e)[:120]}); it should be {k} rows of 3 colors.") from e
  if palette.ndim == 1 and palette.size % 3 == 0:
    palette = palette.reshape(-1, 3)
  if palette.shape != (k, 3) or not np.isfinite(palette).all():
    raise ConversionError(f"{where}: the palette has shape {palette.shape}, not ({k}, 3) "
                          f"finite colors for a model of {k} tokens.")
  return palette


def import_openai(prefix: str, palette_path: str, workdir: str, *, num_heads: int = 0,
                  base_config=None, overwrite: bool = False) -> str:
  get, shapes = read_openai_checkpoint(prefix)
  num_layers, width = openai_shape(shapes)
  num_heads = num_heads or HEADS_BY_WIDTH.get(width, 0)
  if not num_heads:
    raise ConversionError(f"width {width} is not a released iGPT size; pass --num_heads.")
  params = from_openai_variables(get, num_layers=num_layers, num_heads=num_heads)
  palette = checked_palette_file(palette_path, params["wte"].shape[0])
  return write_run(workdir, params, palette, config_for(params, num_heads, base_config),
                   overwrite=overwrite)


EXPORT_FILES = ("model.safetensors", "config.json", "preprocessor_config.json")


def _check_writable(output_dir: str) -> None:
  """Creates `output_dir` and checks that files can be written there, or says why not."""
  try:
    atomic.make_writable_dir(output_dir)
  except OSError as e:
    raise ConversionError(f"--output={output_dir} is not writable ({e.strerror}); pass a "
                          "directory you can write to.") from e


def _check_export_dir(output_dir: str) -> None:
  """Export writes into a new or empty directory, or over a previous export; never elsewhere
  (e.g. a training run, whose config.json it would replace)."""
  if not os.path.exists(output_dir):
    _check_writable(output_dir)
    return
  if not os.path.isdir(output_dir):
    raise ConversionError(f"--output={output_dir} is a file; pass a directory to export into.")
  entries = set(os.listdir(output_dir))
  previous_export = False
  if entries and entries <= set(EXPORT_FILES) and "config.json" in entries:
    try:
      with open(os.path.join(output_dir, "config.json")) as f:
        previous_export = json.load(f).get("model_type") == "imagegpt"
    except (OSError, ValueError):
      previous_export = False
  if entries and not previous_export:
    raise ConversionError(
        f"--output={output_dir} is not empty and is not a previous export (it holds "
        f"{', '.join(sorted(entries)[:5])}{', ...' if len(entries) > 5 else ''}); nothing was "
        "written. Export into a new or empty directory.")
  _check_writable(output_dir)


def export_hf(workdir: str, output_dir: str, config) -> str:
  """Our run's latest checkpoint -> a transformers `save_pretrained`-style directory."""
  if config.objective != "next_pixel":
    raise ConversionError("only next-pixel models map onto ImageGPTForCausalImageModeling.")
  _check_export_dir(output_dir)
  params, step, _ = _params_and_model(workdir, config)
  centers = palette_lib.load_for_run(config, workdir)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(output_dir, exist_ok=True)
  save_file(to_hf_state(params), os.path.join(output_dir, "model.safetensors"),
            metadata={"format": "pt"})
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(hf_config_dict(params, config.model.num_heads), f, indent=2)
  size = config.image_size
  with open(os.path.join(output_dir, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "ImageGPTImageProcessor",
               "clusters": np.asarray(centers).tolist(), "do_resize": True,
               "size": {"height": size, "width": size}, "do_normalize": True,
               "do_color_quantize": True, "resample": 2}, f)
  return f"{output_dir} (step {step})"


def logits_fn(workdir: str, config=None):
  """`f(tokens int [b, seq_len]) -> float32 logits [b, seq_len, palette]` of the latest
  checkpoint in `workdir` (a converted or trained run), and the run's palette [k, 3].

  logits[:, i] predict tokens[:, i] from tokens[:, :i] (next-pixel models).
  """
  if config is None:
    with open(os.path.join(workdir, "config.json")) as f:
      config = ml_collections.ConfigDict(json.load(f))
  params, _, model = _params_and_model(workdir, config)
  centers = palette_lib.load_for_run(config, workdir)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
  return (lambda tokens: np.asarray(apply(params, np.asarray(tokens, np.int32)))), centers
