"""igpt_jax: Image GPT (Chen et al., ICML 2020) in JAX/Flax."""

import os as _os

# TensorFlow only prepares tfds datasets and writes TensorBoard summaries here: keep its C++
# start-up notices (and the oneDNN banner, which also triggers absl's pre-init warning) off the
# console of every tool. Set before anything imports TensorFlow; the user's values win.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
