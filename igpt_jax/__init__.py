"""igpt_jax: Image GPT (Chen et al., ICML 2020) in JAX/Flax."""

__version__ = "0.1.0"
