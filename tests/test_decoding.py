"""Sampling: the cached decoder against the naive sampler, distributions, infilling, the CLI."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import run_tool
from conftest import run_on_fake_devices
from igpt_jax import model as model_lib
from igpt_jax import decoding
from igpt_jax import hlo_cost
from igpt_jax import kv_cache


def make_model(seed=0, head_scale=1.0, **kw):
  base = dict(vocab_size=16, seq_len=36, num_layers=2, width=32, num_heads=4)
  base.update(kw)
  cfg = model_lib.ModelConfig(**base)
  m = model_lib.IGPT(cfg)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(seed),
                                jnp.zeros((1, cfg.seq_len), jnp.int32))["params"])
  params["wtet"] = head_scale * jax.random.normal(jax.random.PRNGKey(seed + 1),
                                                  params["wtet"].shape)
  apply_fn = lambda p, t, keep=None: m.apply({"params": p}, t, keep)
  return cfg, params, apply_fn


def test_cached_decoding_reproduces_full_forward_logits():
  cfg, params, apply_fn = make_model()
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, cfg.seq_len), 0, cfg.vocab_size)
  full = np.asarray(apply_fn(params, tokens))
  prev = jnp.concatenate([jnp.zeros((3, 1), jnp.int32), tokens[:, :-1]], axis=1)
  step = jax.jit(kv_cache.decode, static_argnames=("cfg",))
  # One position at a time, over a cache grown a block of 8 rows at a time.
  cache = kv_cache.empty(cfg, 3, 0)
  for i in range(cfg.seq_len):
    cache = kv_cache.grow(cache, max(kv_cache.length(cache), min(cfg.seq_len, (i // 8 + 1) * 8)))
    logits, cache = step(params, cfg, cache, prev[:, i:i + 1], i)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, i], atol=1e-4, rtol=1e-4)
  assert kv_cache.length(cache) == cfg.seq_len
  # A block of positions in one pass (how a given prefix fills the cache), then the rest; the
  # rows after the block are still zero when it runs (a step sees no row past its own).
  first, cache = step(params, cfg, kv_cache.empty(cfg, 3, cfg.seq_len), prev[:, :20], 0)
  rest, _ = step(params, cfg, cache, prev[:, 20:], 20)
  np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-4, rtol=1e-4)


def test_a_step_reads_only_the_cache_rows_of_its_block_and_before():
  cfg, params, _ = make_model(seq_len=64)
  read = []
  for lo in range(0, 64, 16):
    carry = (jnp.zeros((2, 64), jnp.int32), kv_cache.empty(cfg, 2, lo))
    block = jax.jit(lambda c, lo=lo: decoding.draw_block(
        cfg, params, jax.random.PRNGKey(0), c, lo, lo + 16, prefix_len=0,
        cfg=decoding.SamplingConfig(greedy=True)))
    compiled = block.lower(carry).compile()
    read.append(compiled.cost_analysis()["bytes accessed"])
    # A step reads each layer's cache arrays where they are: nothing in it slices or copies
    # an array the size of one (slicing a layer or the filled rows out of a longer cache did).
    layer_cache = 2 * cfg.num_heads * (lo + 16) * cfg.head_dim
    for ins in _loop_body_instructions(compiled.as_text()):
      if ins.opcode in ("slice", "copy"):
        dims = hlo_cost.array_shapes(ins.shape)[0][1]
        assert np.prod(dims) < layer_cache, (ins.opcode, ins.shape)
  # XLA counts a loop body once: the bytes one step accesses, growing with its block.
  assert read[0] < read[1] < read[2] < read[3], read
  assert read[3] - read[2] > 0.5 * (read[1] - read[0]) > 0, read


def _loop_body_instructions(hlo: str) -> list:
  """The instructions of the computations while loops run as their bodies, fusions included."""
  comps, _ = hlo_cost.parse(hlo)
  todo = [callee for comp in comps.values() for ins in comp if ins.opcode == "while"
          for callee, kind in hlo_cost.called(ins) if kind == "body"]
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo += [callee for ins in comps[name] for callee, kind in hlo_cost.called(ins)
             if kind == "call"]
  return [ins for name in seen for ins in comps[name]]


@pytest.mark.parametrize("prefix_len,block", [(0, 0), (18, 8)])
def test_greedy_cached_equals_naive_exactly(prefix_len, block):
  cfg, params, apply_fn = make_model(head_scale=3.0)
  prefix = jax.random.randint(jax.random.PRNGKey(3), (4, cfg.seq_len), 0, cfg.vocab_size)
  greedy = decoding.SamplingConfig(greedy=True)
  naive = np.asarray(decoding.sample_naive(apply_fn, params, jax.random.PRNGKey(0), prefix,
                                           prefix_len=prefix_len, cfg=greedy))
  cached = np.asarray(decoding.sample(cfg, params, jax.random.PRNGKey(0), prefix,
                                      prefix_len=prefix_len, cfg=greedy, block=block))
  # The comparison means something only if no two top logits nearly tie along the way.
  top2 = jax.lax.top_k(apply_fn(params, jnp.asarray(naive)), 2)[0]
  assert float(jnp.min(top2[..., 0] - top2[..., 1])) > 1e-5
  np.testing.assert_array_equal(cached, naive)
  np.testing.assert_array_equal(cached[:, :prefix_len], np.asarray(prefix)[:, :prefix_len])


def test_sampled_images_equal_the_naive_samplers(prefix_len=16):
  """Drawn (not greedy) with one seed: the same images as the full-recompute sampler, in
  blocks of 8 (two of them given by the prefix) and in the default blocks."""
  cfg, params, apply_fn = make_model(head_scale=3.0)
  prefix = jax.random.randint(jax.random.PRNGKey(4), (6, cfg.seq_len), 0, cfg.vocab_size)
  naive = np.asarray(decoding.sample_naive(apply_fn, params, jax.random.PRNGKey(9), prefix,
                                           prefix_len=prefix_len))
  for block in (8, 0):
    cached = np.asarray(decoding.sample(cfg, params, jax.random.PRNGKey(9), prefix,
                                        prefix_len=prefix_len, block=block))
    np.testing.assert_array_equal(cached, naive)


def test_images_drawn_in_groups_are_the_images_of_the_whole_batch():
  """Each block's steps run a group of images at a time (`group`): the images do not depend on
  the grouping (each image's noise is its row of the whole batch's), drawn or greedy."""
  cfg, params, apply_fn = make_model(head_scale=3.0)
  prefix = jax.random.randint(jax.random.PRNGKey(4), (6, cfg.seq_len), 0, cfg.vocab_size)
  for sampling_cfg, groups in ((decoding.SamplingConfig(), (1, 2, 3)),
                               (decoding.SamplingConfig(greedy=True), (2,))):
    naive = np.asarray(decoding.sample_naive(apply_fn, params, jax.random.PRNGKey(9), prefix,
                                             prefix_len=16, cfg=sampling_cfg))
    for group in groups:
      grouped = decoding.sample(cfg, params, jax.random.PRNGKey(9), prefix, prefix_len=16,
                                block=8, group=group, cfg=sampling_cfg)
      np.testing.assert_array_equal(np.asarray(grouped), naive, err_msg=f"group={group}")
  with pytest.raises(ValueError, match="group=4 must divide the batch"):
    decoding.sample(cfg, params, jax.random.PRNGKey(9), prefix, group=4)


def test_default_group_keeps_a_groups_cache_within_the_cpus_budget():
  """On one CPU device: the largest divisor of the batch (2 or more) whose full-length cache
  fits CPU_GROUP_CACHE_BYTES (16 MiB) and outweighs the weights, else the whole batch."""
  assert jax.default_backend() == "cpu" and decoding.CPU_GROUP_CACHE_BYTES == 16 * 2**20
  small = lambda seq_len, **kw: model_lib.ModelConfig(
      vocab_size=512, seq_len=seq_len, num_layers=2, width=64, num_heads=4, **kw)
  # 2 layers x 64 at 64x64: 2 x 2 x 4,096 x 64 x 4 bytes = 4 MiB an image.
  assert decoding.default_group(small(4096), 32) == 4
  assert decoding.default_group(small(4096), 6) == 3
  assert decoding.default_group(small(4096), 4) == 4
  assert decoding.default_group(small(4096, dtype="bfloat16"), 32) == 8  # 2 MiB an image
  assert decoding.default_group(small(1024), 32) == 16  # 32x32: 1 MiB an image
  assert decoding.default_group(small(1024), 7) == 7
  assert decoding.default_group(small(1024 * 9), 32) == 32  # 9 MiB an image: no two fit
  # 8 layers x 256: 24.5 MiB of weights, more than a group's cache at 16x16 (4 MiB an image).
  big = lambda seq_len: model_lib.ModelConfig(vocab_size=512, seq_len=seq_len, num_layers=8,
                                              width=256, num_heads=4)
  assert decoding.default_group(big(256), 32) == 32
  assert decoding.default_group(big(1024), 32) == 32  # 32x32: 16 MiB an image


def test_sampling_is_reproducible_from_the_seed():
  cfg, params, _ = make_model()
  zeros = jnp.zeros((4, cfg.seq_len), jnp.int32)
  a = decoding.sample(cfg, params, jax.random.PRNGKey(7), zeros)
  b = decoding.sample(cfg, params, jax.random.PRNGKey(7), zeros)
  c = decoding.sample(cfg, params, jax.random.PRNGKey(8), zeros)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def last_pixel_frequencies(cfg, params, prefix, sampling_cfg, n=6000):
  """Draws only the last pixel of `n` copies of `prefix`; returns color frequencies."""
  batch = jnp.broadcast_to(prefix, (n, cfg.seq_len))
  out = decoding.sample(cfg, params, jax.random.PRNGKey(11), batch,
                        prefix_len=cfg.seq_len - 1, cfg=sampling_cfg)
  return np.bincount(np.asarray(out[:, -1]), minlength=cfg.vocab_size) / n


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_frequencies_match_the_softmax(temperature):
  cfg, params, apply_fn = make_model(vocab_size=8, seq_len=16, head_scale=0.2)
  prefix = jax.random.randint(jax.random.PRNGKey(5), (1, cfg.seq_len), 0, cfg.vocab_size)
  probs = np.asarray(jax.nn.softmax(apply_fn(params, prefix)[0, -1] / temperature))
  assert probs.max() < 0.6  # a distribution worth testing, not one color
  freq = last_pixel_frequencies(cfg, params, prefix,
                                decoding.SamplingConfig(temperature=temperature))
  # 6,000 draws: the standard error of a frequency is at most 0.0065; allow 4 of them.
  np.testing.assert_allclose(freq, probs, atol=0.026)


def test_top_k_and_top_p_restrict_and_renormalise():
  cfg, params, apply_fn = make_model(vocab_size=8, seq_len=16, head_scale=0.2)
  prefix = jax.random.randint(jax.random.PRNGKey(5), (1, cfg.seq_len), 0, cfg.vocab_size)
  probs = np.asarray(jax.nn.softmax(apply_fn(params, prefix)[0, -1]))
  order = np.argsort(-probs)

  top3 = np.zeros_like(probs)
  top3[order[:3]] = probs[order[:3]] / probs[order[:3]].sum()
  freq = last_pixel_frequencies(cfg, params, prefix, decoding.SamplingConfig(top_k=3))
  np.testing.assert_allclose(freq, top3, atol=0.026)
  assert freq[order[3:]].sum() == 0

  mass = np.cumsum(probs[order])
  nucleus = order[:int(np.searchsorted(mass, 0.7)) + 1]  # smallest set with mass >= 0.7
  expected = np.zeros_like(probs)
  expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
  freq = last_pixel_frequencies(cfg, params, prefix, decoding.SamplingConfig(top_p=0.7))
  np.testing.assert_allclose(freq, expected, atol=0.026)


def test_infill_keeps_visible_pixels_and_fills_most_confident_first():
  vocab, length = 8, 12

  def apply_fn(params, tokens, keep):
    # Confidence grows with position; the predicted color is the number of visible pixels,
    # so each pixel's color records the pass that filled it.
    del params, tokens
    pos = jnp.arange(length)
    color = jnp.sum(keep, axis=-1, keepdims=True) % vocab  # [batch, 1]
    return jax.nn.one_hot(color, vocab) * (1.0 + pos[:, None])  # [batch, length, vocab]

  tokens = jnp.full((2, length), 7, jnp.int32)
  keep = np.zeros((2, length), bool)
  keep[:, :4] = True
  out = np.asarray(decoding.infill(apply_fn, None, jax.random.PRNGKey(0), tokens, keep,
                                   per_step=3, cfg=decoding.SamplingConfig(greedy=True)))
  np.testing.assert_array_equal(out[:, :4], 7)  # visible pixels untouched
  # Pass 1 fills 9-11 (4 visible), pass 2 fills 6-8 (7 visible), pass 3 fills 4-5 (10 visible).
  np.testing.assert_array_equal(out[:, 4:], [[2, 2, 7, 7, 7, 4, 4, 4]] * 2)


def test_infill_with_a_masked_pixel_model():
  cfg, params, apply_fn = make_model(causal=False)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, cfg.seq_len), 0, cfg.vocab_size)
  keep = np.zeros((3, cfg.seq_len), bool)
  keep[:, :10] = True
  run = lambda seed: np.asarray(decoding.infill(apply_fn, params, jax.random.PRNGKey(seed),
                                                tokens, keep, per_step=5))
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a[:, :10], np.asarray(tokens)[:, :10])
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.min() >= 0 and a.max() < cfg.vocab_size
  # Greedy one-pixel-a-pass infilling of a single pixel is the model's argmax there.
  one = keep.copy()
  one[:, 10:] = True
  one[:, 20] = False
  out = np.asarray(decoding.infill(apply_fn, params, jax.random.PRNGKey(0), tokens, one,
                                   per_step=1, cfg=decoding.SamplingConfig(greedy=True)))
  expected = np.asarray(jnp.argmax(apply_fn(params, tokens, jnp.asarray(one))[:, 20], -1))
  np.testing.assert_array_equal(out[:, 20], expected)


@pytest.fixture
def sampled_run(request, trained_quickstart, tmp_path):
  """(workdir, step, objective): a copy of the shared quickstart run for next-pixel; a short
  masked-pixel quickstart run trained here for masked-pixel."""
  import shutil  # pylint: disable=g-import-not-at-top
  from conftest import quickstart_config  # pylint: disable=g-import-not-at-top
  from igpt_jax import train  # pylint: disable=g-import-not-at-top
  objective, workdir = request.param, str(tmp_path / request.param)
  if objective == "next_pixel":
    shutil.copytree(trained_quickstart, workdir)
    return workdir, 120, objective
  train.train_and_evaluate(quickstart_config(objective=objective, total_steps=20,
                                             checkpoint_every_steps=20, eval_every_steps=20,
                                             warmup_steps=5), workdir)
  return workdir, 20, objective


@pytest.mark.parametrize("sampled_run", ["next_pixel", "masked_pixel"], indirect=True)
def test_sample_cli_writes_grids_and_tokens(sampled_run):
  workdir, step, objective = sampled_run
  base = ["--config=configs/quickstart.py", f"--workdir={workdir}",
          f"--config.objective={objective}"]
  out = run_tool("sample", *base, "--mode=unconditional", "--num=6", "--per_step=8",
                 timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Wrote {os.path.join(workdir, 'samples', f'unconditional_step{step}.png')}" in out.stdout
  tokens = np.load(os.path.join(workdir, "samples", f"unconditional_step{step}.npy"))
  assert tokens.shape == (6, 64) and tokens.dtype == np.int32 and tokens.max() < 16
  assert os.path.exists(os.path.join(workdir, "samples", f"unconditional_step{step}.png"))

  out = run_tool("sample", *base, "--mode=complete", "--num=3", "--completions=2", "--top_k=4",
                 timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  tokens = np.load(os.path.join(workdir, "samples", f"completions_step{step}.npy"))
  assert tokens.shape == (3, 3, 64)
  # Completions keep the original top half (4 rows of 8 pixels).
  np.testing.assert_array_equal(tokens[:, 1:, :32], np.repeat(tokens[:, :1, :32], 2, axis=1))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grid = Image.open(os.path.join(workdir, "samples", f"completions_step{step}.png"))
  assert grid.size[0] > grid.size[1]  # 3 rows of (original, masked, 2 completions)


def test_sample_cli_without_a_run_fails_clearly(tmp_path):
  out = run_tool("sample", "--config=configs/quickstart.py", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "holds no trained run" in out.stderr


def test_many_images_are_sampled_a_batch_at_a_time(trained_quickstart):
  """More images than config.batch_size are drawn a batch at a time (the memory of one batch,
  never an allocation for all of them), each batch from its own key."""
  from conftest import quickstart_config  # pylint: disable=g-import-not-at-top
  from igpt_jax import run as run_lib  # pylint: disable=g-import-not-at-top
  from igpt_jax import sampling  # pylint: disable=g-import-not-at-top
  trained = run_lib.Run(quickstart_config(batch_size=4), trained_quickstart)
  params, _ = trained.latest_params()
  rng = jax.random.PRNGKey(0)
  images = sampling.draw(trained, params, 10, rng)
  assert images.shape == (10, 64) and images.max() < 16
  np.testing.assert_array_equal(images[4:8],
                                sampling.draw(trained, params, 4, jax.random.fold_in(rng, 1)))


SHARDED_SAMPLING = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from test_decoding import make_model
from conftest import tiny_config
from igpt_jax import decoding, kv_cache, sharding

cfg, params, _ = make_model(head_scale=3.0, seq_len=64, width=64, vocab_size=32)
prefix = jax.random.randint(jax.random.PRNGKey(4), (8, cfg.seq_len), 0, cfg.vocab_size)
rng = jax.random.PRNGKey(5)
one_device = np.asarray(decoding.sample(cfg, params, rng, prefix, prefix_len=20, block=16))
config = tiny_config()
config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
mesh = sharding.make_mesh(config)
with sharding.use(mesh, config):
  on_mesh = decoding.sample(cfg, params, rng, prefix, prefix_len=20, block=16)
  grouped = decoding.sample(cfg, params, rng, prefix, prefix_len=20, block=16, group=4)
  group_on_mesh = decoding.default_group(cfg, 8)
  carry = (prefix, kv_cache.empty(cfg, 8, 16))
  _, cache = jax.jit(lambda c: decoding.draw_block(
      cfg, params, rng, c, 16, 32, prefix_len=0, cfg=decoding.SamplingConfig()))(carry)
print("SHARDED" + json.dumps({
    "same": bool(np.array_equal(one_device, np.asarray(on_mesh))),
    "same_grouped": bool(np.array_equal(one_device, np.asarray(grouped))),
    "default_group": group_on_mesh,
    "devices": len(on_mesh.sharding.device_set),
    "cache_spec": str(cache.key[0].sharding.spec),
    "cache_shard": list(cache.key[0].addressable_shards[0].data.shape)}))
"""


def test_sampling_on_a_mesh_draws_the_images_of_one_device():
  """Batch over data x fsdp, heads over tensor (8 fake devices): the cache is split that way
  and the seed draws the same images as on one device, also two groups of 4 images at a time
  (a mesh of several devices draws the whole batch at each step unless told otherwise)."""
  out = run_on_fake_devices(SHARDED_SAMPLING, tag="SHARDED")
  assert out["same"] and out["same_grouped"] and out["devices"] == 8, out
  assert out["default_group"] == 8, out
  assert out["cache_spec"] == str(jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")), out
  # 8 images, 4 heads, head_dim 16, 32 cache rows: a quarter of the images, half the heads.
  assert out["cache_shard"] == [2, 2, 16, 32], out


def test_first_argmax_is_jnp_argmax():
  """Ties (the first wins), -inf entries (filtered colors), NaN (the first NaN) and all -inf."""
  x = np.array(jax.random.normal(jax.random.PRNGKey(3), (64, 512)))
  x[1, [7, 300]] = 9.0  # a tie: 7
  x[2, :500] = -np.inf
  x[3, [11, 40]] = np.nan
  x[4] = -np.inf
  x[5] = 0.0
  np.testing.assert_array_equal(decoding.first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
  assert decoding.first_argmax(jnp.asarray(x)).dtype == jnp.int32
  assert list(np.asarray(decoding.first_argmax(jnp.asarray(x[1:6])))) == [7, 500 + int(
      np.argmax(x[2, 500:])), 11, 0, 0]


def test_draws_are_jax_categorical_and_block_noise_is_per_step_noise():
  """`choose` is `jax.random.categorical` (so a seed draws the images it always drew), and the
  noise a block draws at once is the noise of each step drawn alone."""
  logits = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (5, 32, 512))
  keys = [jax.random.fold_in(jax.random.PRNGKey(1), i) for i in range(3, 8)]
  noise = decoding.block_noise(jax.random.PRNGKey(1), 3, 8, (32, 512))
  for j, key in enumerate(keys):
    np.testing.assert_array_equal(noise[j], decoding.gumbel_noise(key, (32, 512)))
    expected = jax.random.categorical(key, logits[j])
    np.testing.assert_array_equal(decoding.choose(key, logits[j], decoding.SamplingConfig()),
                                  expected)
    np.testing.assert_array_equal(
        decoding.choose(key, logits[j], decoding.SamplingConfig(), noise[j]), expected)
