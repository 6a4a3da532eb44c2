"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Called once, before anything touches a device, by the command-line tools. Sources, first match:

  1. explicit settings (flags of `igpt_jax.main`, or $IGPT_COORDINATOR_ADDRESS,
     $IGPT_NUM_PROCESSES, $IGPT_PROCESS_ID): the coordinator is process 0's `host:port`;
  2. a cluster JAX detects itself: a multi-task SLURM job ($SLURM_NTASKS > 1), a Cloud TPU pod
     slice (several $TPU_WORKER_HOSTNAMES), or anything JAX auto-detects when
     $IGPT_DISTRIBUTED_AUTO=1 (set by launch/tpu_pod.sh);
  3. otherwise a single process: nothing to do.

On CPU the cross-process collectives use gloo. A process that dies is noticed by the others
through the coordination service's heartbeat; `heartbeat_timeout_s` bounds how long they wait.
Processes that never all arrive end start-up after `initialization_timeout_s`
($IGPT_INIT_TIMEOUT_S, default 300) with one error line naming the address and process ids.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import threading
from typing import Optional

import jax

from igpt_jax import errors


class DistributedError(errors.UserError, ValueError):
  """The multi-process settings (flags or $IGPT_* variables) cannot work."""


@dataclasses.dataclass(frozen=True)
class Settings:
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  heartbeat_timeout_s: int = 100
  initialization_timeout_s: int = 300


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise DistributedError(f"${name}={value!r} must be an integer.") from e


def settings_from_env(**overrides) -> Settings:
  """Explicit settings from $IGPT_* variables, overridden by non-None keyword arguments."""
  s = Settings(coordinator_address=os.environ.get("IGPT_COORDINATOR_ADDRESS") or None,
               num_processes=_env_int("IGPT_NUM_PROCESSES"),
               process_id=_env_int("IGPT_PROCESS_ID"),
               heartbeat_timeout_s=_env_int("IGPT_HEARTBEAT_TIMEOUT_S") or 100,
               initialization_timeout_s=_env_int("IGPT_INIT_TIMEOUT_S") or 300)
  return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


def detected_cluster() -> Optional[str]:
  """The kind of multi-process cluster the environment describes, or None."""
  if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
    return "slurm"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "tpu"
  return None


def initialize_kwargs(settings: Settings) -> Optional[dict]:
  """The keyword arguments for jax.distributed.initialize, or None for a single process."""
  explicit = (settings.coordinator_address, settings.num_processes, settings.process_id)
  if any(v is not None for v in explicit):
    if not all(v is not None for v in explicit):
      raise DistributedError(
          "multi-process settings are incomplete: coordinator_address="
          f"{settings.coordinator_address!r}, num_processes={settings.num_processes!r}, "
          f"process_id={settings.process_id!r}. Give all three (flags --coordinator_address, "
          "--num_processes, --process_id or $IGPT_COORDINATOR_ADDRESS, $IGPT_NUM_PROCESSES, "
          "$IGPT_PROCESS_ID), or none for a single process.")
    if not 0 <= settings.process_id < settings.num_processes:
      raise DistributedError(f"process_id={settings.process_id} must be in "
                       f"[0, num_processes={settings.num_processes}).")
    host, _, port = settings.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedError(
          f"coordinator address {settings.coordinator_address!r} needs a port: give process "
          "0's host:port, e.g. 10.0.0.2:1234 (--coordinator_address or "
          "$IGPT_COORDINATOR_ADDRESS).")
    if settings.num_processes == 1:
      return None
    return dict(coordinator_address=settings.coordinator_address,
                num_processes=settings.num_processes, process_id=settings.process_id,
                heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
                initialization_timeout=settings.initialization_timeout_s)
  if os.environ.get("IGPT_DISTRIBUTED_AUTO") == "1" or detected_cluster():
    return dict(heartbeat_timeout_seconds=settings.heartbeat_timeout_s,
                initialization_timeout=settings.initialization_timeout_s)
  return None


_initialized = False


def initialize(settings: Optional[Settings] = None) -> None:
  """Joins the multi-process job described by `settings` (default: the environment)."""
  global _initialized
  if _initialized:
    return
  kwargs = initialize_kwargs(settings or settings_from_env())
  if kwargs is None:
    return
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = kwargs["initialization_timeout"]
  # jax aborts the process (no exception) when the processes do not all arrive in time; this
  # watchdog says why in one line first, and jax's own limit is set past it.
  kwargs["initialization_timeout"] = timeout + 60
  watchdog = threading.Timer(timeout, _give_up, (kwargs, timeout))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    where = ("the flags/$IGPT_* settings" if "coordinator_address" in kwargs else
             "IGPT_DISTRIBUTED_AUTO=1, which needs a cluster jax detects (a TPU pod slice, a "
             "SLURM job, ...)")
    raise DistributedError(
        f"multi-process start-up failed ({' '.join(str(e).split())[:300]}) with {where}. Unset "
        "IGPT_DISTRIBUTED_AUTO off a cluster, or give --coordinator_address, --num_processes "
        "and --process_id.") from e
  finally:
    watchdog.cancel()
  _initialized = True


def _give_up(kwargs: dict, timeout: int) -> None:
  if "coordinator_address" in kwargs:
    who = (f"process {kwargs['process_id']} of {kwargs['num_processes']} waited {timeout} s at "
           f"coordinator {kwargs['coordinator_address']}, and not every process (ids 0.."
           f"{kwargs['num_processes'] - 1}) arrived")
  else:
    who = f"the processes of the detected cluster did not all arrive within {timeout} s"
  print(f"error: DistributedError: {who}. Start every process with the same coordinator "
        "address and its own id, check that process 0's host:port is reachable, or raise "
        "$IGPT_INIT_TIMEOUT_S.", file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access


def _has_accelerator() -> bool:
  """Whether an accelerator plugin is installed, checked without initialising any backend."""
  return any(importlib.util.find_spec(m) is not None
             for m in ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))
