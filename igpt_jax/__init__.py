"""igpt_jax: Image GPT (Chen et al., ICML 2020) in JAX/Flax."""

import glob as _glob
import importlib.util as _util
import os as _os
import sys as _sys

# TensorFlow only prepares tfds datasets and writes TensorBoard summaries here: keep its C++
# start-up notices (and the oneDNN banner, which also triggers absl's pre-init warning) off the
# console of every tool. Set before anything imports TensorFlow; the user's values win.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def tpu_chips_attached() -> bool:
  """Whether this machine has TPU chips (their device files), whatever jax was told to use."""
  return bool(_glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"))


def _cpu_when_no_accelerator_is_attached() -> None:
  """The compilers for `plan` (libtpu, jax-cuda12-plugin) installed on a machine with no TPU
  chip and no NVIDIA GPU: jax would try to open each at start and print their errors (libtpu's
  TPU_WORKER_HOSTNAMES lines, "Unable to load CUDA"). Choose the CPU for it, before jax is
  imported, unless JAX_PLATFORMS says otherwise."""
  if "JAX_PLATFORMS" in _os.environ or "jax" in _sys.modules:
    return
  plugins = [m for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin")
             if _util.find_spec(m) is not None]
  attached = (tpu_chips_attached() or _glob.glob("/dev/nvidia[0-9]*")
              or _os.environ.get("TPU_WORKER_HOSTNAMES"))
  if plugins and not attached:
    _os.environ["JAX_PLATFORMS"] = "cpu"
    # Compile-only TPU devices need no chip, so libtpu's one-process lock guards nothing.
    _os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


_cpu_when_no_accelerator_is_attached()

__version__ = "0.1.0"
