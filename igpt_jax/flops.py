"""Model FLOPs of a training step, the numerator of model FLOPs utilisation (MFU).

Counted the way the PaLM paper (Chowdhery et al. 2022, appendix B) counts them, per token of a
training step (forward + backward = 3 x forward, 2 FLOPs per multiply-add):

    6 * N_matmul  +  12 * L * T * d  (x 1/2 for causal attention)

N_matmul: the parameters used in matrix multiplies: per block q, k, v, out (4 d^2) and the MLP
(2 * mlp_ratio * d^2), plus the d x vocab output head. The token and position tables (and the
sos vector) are looked up, not multiplied, and the norms' gains are elementwise: not counted.
12 * L * T * d: the attention scores q.k (2 T d per query per layer) and the weighted sum of
values (another 2 T d), times 3. A causal model needs only the scores at or below the
diagonal, so its attention counts half (MaxText's convention too): work spent on masked-out
scores is not model FLOPs. Remat recomputation is not model FLOPs either.
"""

from __future__ import annotations


def matmul_params(num_layers: int, width: int, mlp_ratio: int, vocab_size: int) -> int:
  per_block = 4 * width * width + 2 * mlp_ratio * width * width
  return num_layers * per_block + width * vocab_size


def attention_train_flops_per_token(num_layers: int, width: int, seq_len: int,
                                    causal: bool) -> float:
  """The attention scores' and weighted values' share of `train_flops_per_token`."""
  attention = 12.0 * num_layers * seq_len * width
  return attention / 2 if causal else attention


def train_flops_per_token(num_layers: int, width: int, mlp_ratio: int, vocab_size: int,
                          seq_len: int, causal: bool) -> float:
  """Model FLOPs of one training step, per token (see the module docstring)."""
  dense = 6.0 * matmul_params(num_layers, width, mlp_ratio, vocab_size)
  return dense + attention_train_flops_per_token(num_layers, width, seq_len, causal)


def train_flops_per_token_of(model_cfg) -> float:
  """The same for an `igpt_jax.model.ModelConfig`."""
  return train_flops_per_token(model_cfg.num_layers, model_cfg.width, model_cfg.mlp_ratio,
                               model_cfg.vocab_size, model_cfg.seq_len, model_cfg.causal)


def sample_flops_per_token_of(model_cfg) -> float:
  """Model FLOPs of drawing one pixel with a key/value cache: one forward pass of one position,
  2 * N_matmul plus its attention over the positions before it (4 * L * p * d at position p,
  2 * L * T * d on average): a third of a causal model's training FLOPs per token."""
  return train_flops_per_token(model_cfg.num_layers, model_cfg.width, model_cfg.mlp_ratio,
                               model_cfg.vocab_size, model_cfg.seq_len, causal=True) / 3
