"""The base experiment config every `configs/*.py` derives from, and its validation.

Every knob has a default here. `validate(config)` runs once, before anything compiles, and
raises `ConfigError` naming the field and the fix.
"""

from __future__ import annotations

import math
from typing import Optional

import ml_collections
import numpy as np

from igpt_jax import errors

OBJECTIVES = ("next_pixel", "masked_pixel")
DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest")
MESH_AXES = ("data", "fsdp", "tensor")
TRANSFER_GUARDS = ("disallow", "log", "allow")

# Logical axis -> mesh axes. Parameters: FSDP shards `embed` over `fsdp`, Megatron-style
# tensor parallelism splits heads and MLP width over `tensor`. Activations: the batch is split
# over `data` and `fsdp`; heads/MLP activations follow their weights.
DEFAULT_RULES = (
    ("vocab", None),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", None),
)


class ConfigError(errors.UserError, ValueError):
  """A config field has a value that cannot work; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all configs: the paper's recipe on CIFAR-10 at 32x32 with iGPT-S."""
  c = ml_collections.ConfigDict()

  # Data. `dataset`: a tfds name (cifar10, cifar100, stl10, imagenet2012, ...), a path to a
  # local folder `<split>/<label>/<image>`, or `digits` (scikit-learn's 8x8 digits, built in).
  c.dataset = "cifar10"
  c.data_dir = ""  # tfds data_dir; also where local folders are converted. "" = tfds default.
  c.download = True  # let tfds download a hub dataset that is not prepared yet.
  # Resuming a workdir with another dataset/train_split/holdout_fraction is refused unless this
  # is set (the old config.json is then kept as config.<time>.json).
  c.allow_data_change = False
  c.train_split = "train"
  c.test_split = "test"
  c.holdout_fraction = 0.1  # tail of the train split held out as validation (paper: 10%).
  c.image_size = 32
  c.train_crop_fraction = (1.0, 1.0)  # random square crop side, as a fraction of the short side.
  c.train_flip = False
  c.train_pad_crop = 0  # random crop of the resized image padded by this many pixels a side.
  # Input (igpt_jax/input_pipeline.py, grain): records are decoded, augmented and quantised in
  # `input_threads` reader threads of each process, `input_prefetch` batches ahead; with
  # `input_workers` > 0, in that many worker processes as well (decoding large JPEGs, e.g.
  # ImageNet, on hosts with cores to spare).
  c.input_threads = 4
  c.input_prefetch = 8
  c.input_workers = 0

  # Palette. "" = `workdir/palette.npy`, fitted on the train split when missing.
  c.palette_size = 512
  c.palette_path = ""
  c.palette_fit_images = 10_000
  c.palette_fit_pixels = 500_000
  c.palette_fit_iterations = 30

  # Objective.
  c.objective = "next_pixel"
  c.mask_prob = 0.15

  # Model (iGPT-S by default).
  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 24
  c.model.width = 512
  c.model.num_heads = 8
  c.model.mlp_ratio = 4
  c.model.dtype = "float32"  # compute dtype; master weights stay float32.
  c.model.remat_policy = "none"
  # Attention kernel (igpt_jax/attention.py; all exact): "auto" = the fused cuDNN kernel on a
  # GPU with bfloat16 compute, else "blockwise" (flash-style, causal blocks skipped, no
  # length^2 tensor kept); "dense" is the plain reference; "cudnn" forces the GPU kernel,
  # "pallas_gpu" the Pallas (Triton) GPU kernel.
  c.model.attention = "auto"
  c.model.attention_block = 128  # query block of the blockwise kernel.
  # Precision of float32 matmuls: "default" lets the platform choose (TF32 on NVIDIA GPUs since
  # Ampere, one bfloat16 pass on TPUs: fast, ~3 significant digits), "high" (3 bfloat16 passes
  # on TPUs; TF32 on GPUs), "highest" (full float32 everywhere; slowest). bfloat16 compute
  # (model.dtype) is not affected. The palette's k-means always uses "highest".
  c.model.matmul_precision = "default"

  # Optimisation (paper: Adam b2 0.95, no weight decay, one-epoch warmup, cosine to 0).
  c.batch_size = 128  # global.
  c.grad_accum_steps = 1  # micro-batches per step (gradients averaged); batch_size is the total.
  c.total_steps = 1_000_000
  c.learning_rate = 3e-3
  c.warmup_steps = -1  # -1 = one epoch of the (held-out-reduced) train split.
  c.adam_b1 = 0.9
  c.adam_b2 = 0.95
  c.adam_eps = 1e-8
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.seed = 0
  # A non-finite loss or gradient: "stop" the run (the last good checkpoint stays the latest)
  # or "skip" the update (params and optimizer state unchanged), stopping after
  # max_nonfinite_skips skipped steps in all.
  c.nonfinite_policy = "stop"
  c.max_nonfinite_skips = 20
  # With several processes, how often they agree on a SIGTERM/preemption stop (each agreement
  # waits for the device); a single process checks every step.
  c.preemption_check_every_steps = 10
  # jax.transfer_guard level around each training step: "disallow" makes an implicit
  # host<->device copy in the step (a NumPy or Python value where an array should already be
  # on the devices) an error instead of a silent slowdown; "log" reports it; "allow" turns the
  # guard off.
  c.transfer_guard = "disallow"

  # Devices. -1 means "all remaining devices".
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = DEFAULT_RULES

  # Bookkeeping. With the device's peak (dense, in the compute dtype: H100 SXM bf16 989,
  # A100 bf16 312, TPU v4 275, v5e 197), the progress line and metrics.jsonl carry MFU.
  c.peak_tflops_per_device = 0.0
  c.log_every_steps = 50
  c.eval_every_steps = 5_000
  c.eval_batches = 20  # validation batches per evaluation; -1 = the whole held-out split.
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3
  c.num_samples = 8  # images sampled at the end of training into workdir/samples.
  c.sample_temperature = 1.0

  c.eval = eval_config()
  # In-training evaluators (big_vision style): name -> ConfigDict with `every_steps` and any
  # config.eval fields laid over config.eval for it, run by `python -m igpt_jax.main` on the live
  # parameters; results go to metrics.jsonl and TensorBoard (probe/<name>/layer<l>/test_acc,
  # probe/<name>/best_test_acc, bits_per_dim/<name>, ...) and JSON under WORKDIR/evals/<name>/.
  # E.g. a linear probe on 5,000 CIFAR-10 images every 2,000 steps:
  #   c.evals.cifar10 = ml_collections.ConfigDict(dict(every_steps=2000, tasks="linear_probe",
  #       dataset="cifar10", max_train_examples=5000, layers="auto", raw_pixel_baseline=False))
  c.evals = ml_collections.ConfigDict()
  return c


EVAL_TASKS = ("linear_probe", "bits_per_dim", "low_data", "finetune")

# Splits of the datasets the paper evaluates on (tfds names); `eval.dataset` picks one.
EVAL_SPLITS = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test"),
    "imagenet2012": ("train", "validation"),
}


def eval_config() -> ml_collections.ConfigDict:
  """Settings of `python -m igpt_jax.evaluate` (config.eval)."""
  e = ml_collections.ConfigDict()
  e.tasks = "linear_probe,bits_per_dim"  # any of EVAL_TASKS, comma separated.
  # The dataset to evaluate on ("" = config.dataset): a tfds name or a local image folder. It
  # is read at the model's image_size with the checkpoint's palette.
  e.dataset = ""
  e.train_split = ""  # "" = the dataset's usual split (EVAL_SPLITS), else config.train_split.
  e.test_split = ""
  e.holdout_fraction = 0.1  # tail of the train split the probe's L2 is chosen on.
  e.max_train_examples = -1  # -1 = all; else the first N of the (held-out-reduced) train split.
  e.step = -1  # checkpoint step to evaluate; -1 = the latest.
  e.batch_size = 0  # feature-extraction batch; 0 = config.batch_size.
  # Features are written to WORKDIR/eval/features/ batch by batch (resumable) in this dtype and
  # read back in chunks; a probe whose standardised training features (float32) exceed
  # max_host_gib is fit by minibatch SGD streamed from disk instead of in memory.
  e.feature_dtype = "float16"  # or "float32"
  e.max_host_gib = 8.0
  # Linear probe.
  e.layers = "auto"  # 'auto', 'all' or e.g. '12,16,20' (0 = embeddings, L = final output).
  # One more probe on several extracted layers' features side by side (the paper's best
  # ImageNet probe): '' (none), 'all' (every extracted layer), e.g. '2,3,4', or 'best:K' (the K
  # extracted layers centred on the best single layer, chosen on validation).
  e.concat_layers = ""
  e.probe_solver = "lbfgs"  # 'lbfgs' (full batch; CIFAR/STL) or 'sgd' (ImageNet).
  e.probe_l2 = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths swept, chosen on validation.
  e.probe_max_iters = 1_000
  e.probe_sgd_epochs = 30
  e.raw_pixel_baseline = True
  # Low-data probes: N labelled training examples per class, several seeds, at one layer.
  e.low_data_per_class = (4, 10, 25, 100, 400)  # sizes a class cannot supply are skipped.
  e.low_data_folds = 5  # L2 by k-fold cross-validation inside each labelled subset.
  e.low_data_seeds = 3
  e.low_data_layer = -1  # -1 = the best layer of linear_probe.json (else the middle layer).
  # Fine-tuning: generative + classification loss, zero-initialised head on the pooled final
  # features, early stopping on validation accuracy.
  e.finetune_steps = 1_000
  e.finetune_batch_size = 0  # 0 = config.batch_size.
  e.finetune_learning_rate = 3e-4  # paper: ~10x below pre-training.
  e.finetune_warmup_steps = 100
  e.finetune_clf_weight = 1.0  # total loss = generative + clf_weight * classification.
  e.finetune_eval_every_steps = 200
  e.finetune_eval_batches = -1
  # Fine-tuning's own augmentation (not pre-training's): the CIFAR recipe by default, a random
  # crop of the image padded by 4 pixels and a random flip, no scale crop. Masked-pixel models
  # are fine-tuned on masked inputs and tested on the mean class logits of this many masks.
  e.finetune_crop_fraction = (1.0, 1.0)
  e.finetune_pad_crop = 4
  e.finetune_flip = True
  e.bert_mask_ensemble = 8
  return e


# The paper's model sizes on ImageNet (configs/imagenet.py:VARIANT). Learning rates: S is the
# paper's 0.003; M, L, XL are our starting points for the sweep the paper ran per size. XL: the
# paper's batch 64 for 2M steps at 64x64; its 24 heads (head_dim 128) are our choice.
IMAGENET_VARIANTS = {
    #     layers width heads  lr     remat            overrides
    "s": (24, 512, 8, 3e-3, "none", {}),
    "m": (36, 1024, 8, 1e-3, "none", {}),
    "l": (48, 1536, 16, 1e-3, "dots_saveable", {}),
    "xl": (60, 3072, 24, 5e-4, "full",
           {"image_size": 64, "batch_size": 64, "total_steps": 2_000_000}),
}


def imagenet_config(variant: Optional[str] = None) -> ml_collections.ConfigDict:
  """The paper's ImageNet pre-training recipe, at the size `variant` (s, m, l, xl) if given."""
  c = base_config()
  c.dataset = "imagenet2012"
  c.test_split = "validation"
  c.holdout_fraction = 0.04
  # Paper: random short side in [256, 384], random 224 crop -> crop side is 58%-88% of the
  # short side, then an area downsample to the model resolution. Eval: centre crop.
  c.train_crop_fraction = (224 / 384, 224 / 256)
  c.input_threads = 16
  c.input_prefetch = 16
  c.input_workers = 8
  # The paper does not clip gradients (base_config clips at 1.0 for the small CPU configs).
  c.grad_clip_norm = 0.0
  if variant is None:
    return c
  if variant not in IMAGENET_VARIANTS:
    raise ConfigError(f"imagenet variant {variant!r}: use one of {sorted(IMAGENET_VARIANTS)} "
                      "(e.g. --config=configs/imagenet.py:l).")
  layers, width, heads, lr, remat, overrides = IMAGENET_VARIANTS[variant]
  igpt_size(c, num_layers=layers, width=width, num_heads=heads)
  c.learning_rate, c.model.remat_policy = lr, remat
  c.update(overrides)
  return c


def igpt_size(c: ml_collections.ConfigDict, num_layers: int, width: int, num_heads: int):
  c.model.num_layers, c.model.width, c.model.num_heads = num_layers, width, num_heads
  return c


def _fail(field, value, fix):
  raise ConfigError(f"config.{field}={value!r}: {fix}")


_REQUIRED = object()


def get_field(config, field: str, default=_REQUIRED):
  """config["a"]["b"] for field "a.b", in a ConfigDict or a plain dict (a saved config.json);
  `default` where a part is missing (without one, a missing part raises KeyError)."""
  value = config
  for part in field.split("."):
    try:
      value = value[part]
    except (KeyError, TypeError):
      if default is _REQUIRED:
        raise
      return default
  return value


def _positive_int(c, field):
  value = get_field(c, field)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    _fail(field, value, "must be a positive integer.")


def _crop_fraction(c, field, default=_REQUIRED):
  value = get_field(c, field, default)
  lo, hi = tuple(value)
  if not 0.0 < lo <= hi <= 1.0:
    _fail(field, value, "must be (lo, hi) with 0 < lo <= hi <= 1.")


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Fills the one -1 entry of config.mesh so the product is the device count."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  for axis, s in zip(MESH_AXES, sizes):
    if isinstance(s, bool) or not isinstance(s, int) or (s < 1 and s != -1):
      _fail(f"mesh.{axis}", s, "must be a positive integer or -1 (all remaining devices).")
  if sizes.count(-1) > 1:
    _fail("mesh", dict(zip(MESH_AXES, sizes)), "at most one axis may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    _fail("mesh", dict(zip(MESH_AXES, sizes)),
          f"the fixed axes multiply to {known}, which does not divide the {num_devices} "
          "devices available.")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    _fail("mesh", dict(zip(MESH_AXES, sizes)),
          f"the axes multiply to {math.prod(sizes)} but {num_devices} devices are available; "
          "set one axis to -1.")
  return tuple(sizes)


def validate(c: ml_collections.ConfigDict, num_devices: int, platform: str | None = None) -> None:
  """Checks every field before anything compiles. Raises ConfigError naming the field.
  `platform` ("cpu", "gpu", "tpu"): of the devices the run is for (default: the current ones).
  """
  if not isinstance(c.dataset, str) or not c.dataset:
    _fail("dataset", c.dataset, "must be a tfds name, a local image folder, or 'digits'.")
  if c.objective not in OBJECTIVES:
    _fail("objective", c.objective, f"must be one of {OBJECTIVES}.")
  for field in ("image_size", "palette_size", "batch_size", "total_steps", "model.num_layers",
                "model.width", "model.num_heads", "model.mlp_ratio", "log_every_steps",
                "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "palette_fit_images", "palette_fit_pixels", "palette_fit_iterations",
                "input_threads", "input_prefetch"):
    _positive_int(c, field)
  if c.palette_size < 2:
    _fail("palette_size", c.palette_size, "needs at least 2 colors.")
  if c.palette_fit_pixels < c.palette_size:
    _fail("palette_fit_pixels", c.palette_fit_pixels,
          f"must be at least palette_size={c.palette_size} to fit that many centers.")
  if c.model.width % c.model.num_heads:
    _fail("model.width", c.model.width,
          f"must be divisible by model.num_heads={c.model.num_heads} (head_dim = width / "
          "heads); change one of them.")
  if c.model.dtype not in DTYPES:
    _fail("model.dtype", c.model.dtype, f"must be one of {DTYPES}.")
  if c.model.get("matmul_precision", "default") not in MATMUL_PRECISIONS:
    _fail("model.matmul_precision", c.model.matmul_precision,
          f"must be one of {MATMUL_PRECISIONS}.")
  from igpt_jax.model import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
  if c.model.remat_policy not in REMAT_POLICIES:
    _fail("model.remat_policy", c.model.remat_policy, f"must be one of {REMAT_POLICIES}.")
  _validate_attention(c, platform)
  if c.get("peak_tflops_per_device", 0.0) < 0:
    _fail("peak_tflops_per_device", c.peak_tflops_per_device, "must be >= 0 (0 = unknown).")
  if not 0.0 < c.mask_prob < 1.0:
    _fail("mask_prob", c.mask_prob, "must be in (0, 1); the paper masks 15% of pixels.")
  if not 0.0 <= c.holdout_fraction < 1.0:
    _fail("holdout_fraction", c.holdout_fraction, "must be in [0, 1).")
  if not (isinstance(c.learning_rate, (int, float)) and c.learning_rate > 0):
    _fail("learning_rate", c.learning_rate, "must be a positive number.")
  if isinstance(c.warmup_steps, bool) or not isinstance(c.warmup_steps, int) or (
      c.warmup_steps < -1):
    _fail("warmup_steps", c.warmup_steps, "must be >= 0, or -1 for one epoch.")
  if c.warmup_steps > c.total_steps:
    _fail("warmup_steps", c.warmup_steps, f"exceeds total_steps={c.total_steps}.")
  for field in ("adam_b1", "adam_b2"):
    if not 0.0 <= c[field] < 1.0:
      _fail(field, c[field], "must be in [0, 1).")
  if c.weight_decay < 0:
    _fail("weight_decay", c.weight_decay, "must be >= 0 (the paper uses 0).")
  if c.grad_clip_norm < 0:
    _fail("grad_clip_norm", c.grad_clip_norm, "must be >= 0 (0 disables clipping).")
  _crop_fraction(c, "train_crop_fraction")
  if isinstance(c.eval_batches, bool) or not isinstance(c.eval_batches, int) or (
      c.eval_batches == 0 or c.eval_batches < -1):
    _fail("eval_batches", c.eval_batches, "must be a positive integer or -1 (whole split).")
  if c.num_samples < 0:
    _fail("num_samples", c.num_samples, "must be >= 0.")
  if not c.sample_temperature > 0:
    _fail("sample_temperature", c.sample_temperature, "must be > 0.")

  if isinstance(c.input_workers, bool) or not isinstance(c.input_workers, int) or (
      c.input_workers < 0):
    _fail("input_workers", c.input_workers, "must be >= 0 (0 = reader threads only).")
  if c.get("transfer_guard", "disallow") not in TRANSFER_GUARDS:
    _fail("transfer_guard", c.transfer_guard, f"must be one of {TRANSFER_GUARDS}.")
  if c.nonfinite_policy not in ("stop", "skip"):
    _fail("nonfinite_policy", c.nonfinite_policy, "must be 'stop' or 'skip'.")
  _positive_int(c, "max_nonfinite_skips")
  _positive_int(c, "preemption_check_every_steps")
  _validate_eval(c)
  _validate_evals(c)

  mesh = dict(zip(MESH_AXES, resolve_mesh_shape(c.mesh, num_devices)))
  batch_shards = mesh["data"] * mesh["fsdp"]
  if c.batch_size % batch_shards:
    hint = ""
    if batch_shards > c.batch_size and num_devices % c.batch_size == 0:
      # More devices than images: split the rest of the devices over heads/MLP instead.
      tensor = num_devices // c.batch_size
      hint = (f" With {num_devices} devices and a batch of {c.batch_size}, shard the model "
              f"over the rest: --config.mesh.data=1 --config.mesh.fsdp={c.batch_size} "
              f"--config.mesh.tensor={tensor}"
              + (" (tensor must divide model.num_heads)" if c.model.num_heads % tensor else "")
              + ", or raise config.batch_size.")
    _fail("batch_size", c.batch_size,
          f"must be divisible by the data-parallel size mesh.data*mesh.fsdp={batch_shards}."
          + hint)
  _positive_int(c, "grad_accum_steps")
  if c.batch_size % (c.grad_accum_steps * batch_shards):
    _fail("grad_accum_steps", c.grad_accum_steps,
          f"batch_size={c.batch_size} must split into grad_accum_steps micro-batches that "
          f"each divide over the data-parallel size {batch_shards}.")
  if c.model.num_heads % mesh["tensor"]:
    _fail("model.num_heads", c.model.num_heads,
          f"must be divisible by mesh.tensor={mesh['tensor']}.")
  if (c.model.mlp_ratio * c.model.width) % mesh["tensor"]:
    _fail("model.mlp_ratio", c.model.mlp_ratio,
          f"MLP width {c.model.mlp_ratio * c.model.width} must divide by mesh.tensor.")
  if c.model.width % mesh["fsdp"]:
    _fail("model.width", c.model.width, f"must be divisible by mesh.fsdp={mesh['fsdp']}.")
  rule_names = [r[0] for r in c.logical_axis_rules]
  for name in ("vocab", "length", "embed", "heads", "kv", "mlp", "layers", "act_batch"):
    if name not in rule_names:
      _fail("logical_axis_rules", "...", f"has no rule for the logical axis {name!r}.")


def _validate_attention(c, platform: str | None) -> None:
  from igpt_jax import attention  # pylint: disable=g-import-not-at-top  # (attention -> jax)
  impl = c.model.get("attention", "auto")
  if impl not in attention.IMPLEMENTATIONS:
    _fail("model.attention", impl, f"must be one of {attention.IMPLEMENTATIONS}.")
  current, kind = attention.current_platform()
  platform = platform or current
  if impl == "splash" and platform != "tpu":
    _fail("model.attention", impl, f"is the TPU kernel (these devices are {platform}: it would "
          "run in Pallas interpret mode, far too slowly to train); use 'auto'.")
  if impl == "pallas_gpu" and platform != "gpu":
    _fail("model.attention", impl, f"is the GPU kernel (these devices are {platform}: it would "
          "run in Pallas interpret mode, far too slowly to train); use 'auto'.")
  if impl == "cudnn":
    if platform != "gpu" or "nvidia" not in kind.lower():
      _fail("model.attention", impl, f"needs an NVIDIA GPU (this one is {kind!r}); use 'auto' "
            "or 'blockwise'.")
    if c.model.dtype != "bfloat16":
      _fail("model.attention", impl, "cuDNN's fused attention needs model.dtype='bfloat16'; "
            "set it, or use 'blockwise' for float32.")
  block = c.model.get("attention_block", 128)
  if isinstance(block, bool) or not isinstance(block, int) or block < 1:
    _fail("model.attention_block", block, "must be a positive int (128 suits CPUs).")


def eval_tasks(c) -> list[str]:
  return [t.strip() for t in str(c.eval.tasks).split(",") if t.strip()]


def _validate_evals(c) -> None:
  """Each in-training evaluator: a positive every_steps, config.eval fields only, and the
  config.eval it makes valid."""
  evals = c.get("evals", None) or {}
  for name, ev in evals.items():
    every = ev.get("every_steps", None) if hasattr(ev, "get") else None
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
      _fail(f"evals.{name}.every_steps", every, "must be a positive number of steps.")
    unknown = [k for k in ev.keys() if k != "every_steps" and k not in c.eval]
    if unknown:
      _fail(f"evals.{name}", sorted(unknown), "are not config.eval fields (each evaluator "
            "sets config.eval fields for itself, plus every_steps).")
    merged = ml_collections.ConfigDict(c.to_dict())
    merged.eval.update({k: v for k, v in ev.items() if k != "every_steps"})
    try:
      _validate_eval(merged)
    except ConfigError as e:
      raise ConfigError(f"in config.evals.{name}: {e}") from e


def parse_layers(spec: str, num_layers: int) -> list[int]:
  """'auto' | 'all' | '0,12,24' -> sorted layer indices in [0, num_layers].

  'auto' is every layer for models of up to 12 layers, otherwise 8 layers spread over the depth
  with the middle one included (where the paper finds the best features).
  """
  spec = str(spec).strip().lower()
  if spec == "all":
    return list(range(num_layers + 1))
  if spec in ("", "auto"):
    if num_layers <= 12:
      return list(range(1, num_layers + 1))
    spread = np.rint(np.linspace(1, num_layers, 8)).astype(int).tolist()
    return sorted(set(spread) | {num_layers // 2})
  try:
    layers = sorted({int(s) for s in spec.split(",") if s.strip()})
  except ValueError:
    layers = []
  if not layers or layers[0] < 0 or layers[-1] > num_layers:
    raise ConfigError(f"config.eval.layers={spec!r} must be 'auto', 'all' or comma-separated "
                     f"layer indices in [0, {num_layers}] (0 = embeddings, {num_layers} = final "
                     "normalised output).")
  return layers


def parse_concat(spec: str, layers: list[int]) -> list[int] | int | None:
  """config.eval.concat_layers against the extracted `layers` -> None (no concatenated probe),
  the layers to concatenate, or K for 'best:K' (`centred` picks them once the best is known)."""
  spec = str(spec).strip().lower().replace(" ", "")
  if not spec:
    return None
  fix = (f"must be '' (none), 'all', 'best:K' with 2 <= K <= {len(layers)}, or at least two of "
         f"the extracted layers {layers} (config.eval.layers), comma-separated.")
  if spec == "all":
    chosen = list(layers)
  elif spec.startswith("best:"):
    try:
      k = int(spec[len("best:"):])
    except ValueError:
      k = 0
    if not 2 <= k <= len(layers):
      _fail("eval.concat_layers", spec, fix)
    return k
  else:
    try:
      chosen = sorted({int(s) for s in spec.split(",") if s})
    except ValueError:
      chosen = []
    if any(l not in layers for l in chosen):
      _fail("eval.concat_layers", spec, fix)
  if len(chosen) < 2:
    _fail("eval.concat_layers", spec, fix)
  return chosen


def centred(layers: list[int], best: int, k: int) -> list[int]:
  """The k consecutive entries of `layers` centred on `best` (shifted inward at either end)."""
  start = min(max(layers.index(best) - (k - 1) // 2, 0), len(layers) - k)
  return layers[start:start + k]


def _validate_eval(c) -> None:
  e = c.eval
  tasks = eval_tasks(c)
  if not tasks or any(t not in EVAL_TASKS for t in tasks):
    _fail("eval.tasks", e.tasks, f"must be a comma-separated list of {EVAL_TASKS}.")
  if not 0.0 < e.holdout_fraction < 1.0:
    _fail("eval.holdout_fraction", e.holdout_fraction,
          "must be in (0, 1): the probe chooses its L2 strength on that held-out part.")
  _crop_fraction(c, "eval.finetune_crop_fraction", (1.0, 1.0))
  pad = e.get("finetune_pad_crop", 0)
  if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < c.image_size:
    _fail("eval.finetune_pad_crop", pad, f"must be an integer in [0, {c.image_size}).")
  if e.get("feature_dtype", "float16") not in ("float16", "float32"):
    _fail("eval.feature_dtype", e.feature_dtype, "must be 'float16' or 'float32'.")
  max_host = e.get("max_host_gib", 8.0)
  if isinstance(max_host, bool) or not isinstance(max_host, (int, float)) or max_host <= 0:
    _fail("eval.max_host_gib", max_host, "must be a positive number of GiB.")
  if e.probe_solver not in ("lbfgs", "sgd"):
    _fail("eval.probe_solver", e.probe_solver, "must be 'lbfgs' or 'sgd'.")
  l2 = tuple(e.probe_l2) if isinstance(e.probe_l2, (tuple, list)) else ()
  if not l2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in l2):
    _fail("eval.probe_l2", e.probe_l2, "must be a non-empty tuple of L2 strengths >= 0.")
  for field in ("probe_max_iters", "probe_sgd_epochs", "low_data_seeds", "low_data_folds",
                "finetune_steps",
                "finetune_eval_every_steps", "bert_mask_ensemble"):
    _positive_int(c, f"eval.{field}")
  per_class = e.low_data_per_class
  if not isinstance(per_class, (tuple, list)) or not per_class or any(
      isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in per_class):
    _fail("eval.low_data_per_class", per_class, "must be a tuple of positive integers.")
  if e.low_data_folds < 2:
    _fail("eval.low_data_folds", e.low_data_folds, "must be at least 2 (one fold held out, "
          "the rest fitted).")
  for field in ("batch_size", "finetune_batch_size"):
    v = e[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      _fail(f"eval.{field}", v, "must be >= 0 (0 = config.batch_size).")
  if not (isinstance(e.finetune_learning_rate, (int, float)) and e.finetune_learning_rate > 0):
    _fail("eval.finetune_learning_rate", e.finetune_learning_rate, "must be a positive number.")
  if e.finetune_clf_weight < 0:
    _fail("eval.finetune_clf_weight", e.finetune_clf_weight, "must be >= 0.")
  if e.max_train_examples == 0 or e.max_train_examples < -1:
    _fail("eval.max_train_examples", e.max_train_examples, "must be positive or -1 (all).")
  layers = parse_layers(e.layers, c.model.num_layers)
  parse_concat(e.get("concat_layers", ""), layers)
  low = e.get("low_data_layer", -1)
  if "low_data" in tasks and isinstance(low, int) and low >= 0 and low not in layers:
    _fail("eval.low_data_layer", low, f"is not among the extracted layers {layers} "
          "(config.eval.layers); add it there, or use -1 for the best of them.")


def eval_data_config(c) -> ml_collections.ConfigDict:
  """A copy of `c` that reads the evaluation dataset (config.eval) instead of the training one."""
  e = c.eval
  out = ml_collections.ConfigDict(c.to_dict())
  if e.dataset:
    out.dataset = e.dataset
    train, test = EVAL_SPLITS.get(e.dataset, (c.train_split, c.test_split))
    out.train_split, out.test_split = train, test
  if e.train_split:
    out.train_split = e.train_split
  if e.test_split:
    out.test_split = e.test_split
  out.holdout_fraction = e.holdout_fraction
  return out
