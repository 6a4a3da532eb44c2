"""The model-FLOPs count behind MFU matches the model's own parameters."""

import flax.linen as nn
import jax
import pytest

from igpt_jax import flops
from igpt_jax import model as model_lib

MATMUL_KERNELS = ("query", "key", "value", "out", "kernel", "wtet")  # "kernel": mlp fc/proj


@pytest.mark.parametrize("layers, width, heads, vocab, side, causal", [
    (24, 512, 8, 512, 32, True),  # iGPT-S
    (2, 64, 4, 16, 8, False),
])
def test_matmul_params_are_the_models_matmul_weights(layers, width, heads, vocab, side, causal):
  cfg = model_lib.ModelConfig(vocab_size=vocab, seq_len=side * side, num_layers=layers,
                              width=width, num_heads=heads, causal=causal)
  params = nn.meta.unbox(model_lib.abstract_params(cfg))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  in_matmuls = sum(x.size for path, x in leaves if getattr(path[-1], "key", "") in MATMUL_KERNELS)
  assert flops.matmul_params(layers, width, 4, vocab) == in_matmuls
  # Everything else is a lookup table or a norm gain.
  others = {getattr(p[-1], "key", "") for p, _ in leaves} - set(MATMUL_KERNELS)
  assert others <= {"wte", "wpe", "sos", "scale"}, others


def test_igpt_s_flops_per_token():
  # iGPT-S at 32x32: 6 * (24 * 12 * 512^2 + 512 * 512) + 12 * 24 * 1024 * 512 / 2.
  expected = 6 * (24 * 12 * 512**2 + 512 * 512) + 6 * 24 * 1024 * 512
  assert flops.train_flops_per_token(24, 512, 4, 512, 1024, causal=True) == expected
  assert flops.train_flops_per_token(24, 512, 4, 512, 1024, causal=False) == (
      expected + 6 * 24 * 1024 * 512)
