"""Two processes on 127.0.0.1 (gloo, 2 CPU devices each): same losses as one process, sharded
checkpoints restored onto another mesh and device count, and a dead peer stops the other."""

import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

import forked

from conftest import REPO
from conftest import metrics_by_step
from conftest import wait_for_logged_steps
from conftest import run_tool
from conftest import tool_command

BASE = tool_command("main", "--config=configs/quickstart.py", "--config.warmup_steps=2",
                    "--config.num_samples=0", "--config.log_every_steps=1")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  for k in ("IGPT_COORDINATOR_ADDRESS", "IGPT_NUM_PROCESSES", "IGPT_PROCESS_ID"):
    env.pop(k, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def two_processes(args, port, **popen_kw):
  return [forked.popen(
      BASE + args, cwd=REPO, text=True,
      env=env_for(2, IGPT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", IGPT_NUM_PROCESSES=2,
                  IGPT_PROCESS_ID=rank, IGPT_HEARTBEAT_TIMEOUT_S=10), **popen_kw)
          for rank in (0, 1)]


def losses(workdir):
  return {step: row["loss"] for step, row in metrics_by_step(workdir).items()}


def run_one(args, devices):
  out = forked.run(BASE + args, cwd=REPO, env=env_for(devices), capture_output=True,
                   text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_two_processes_match_one_and_restore_on_another_mesh(tmp_path):
  six = ["--config.total_steps=6", "--config.checkpoint_every_steps=3",
         "--config.eval_every_steps=6"]
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  procs = two_processes(six + [f"--workdir={multi}"], free_port(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert "2 process(es), 4 device(s)" in outs[0]
  assert "step 1/6" not in outs[1]  # only process 0 logs
  # Both processes wrote their shards of the checkpoint.
  state_dir = os.path.join(multi, "checkpoints", "6", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))

  run_one(six + [f"--workdir={single}"], devices=4)
  a, b = losses(multi), losses(single)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)

  # Continue both to step 8: the two-process checkpoint on one process with 8 devices as a
  # 2x2x2 mesh, the single-process one on 1 device. Same losses.
  eight = ["--config.total_steps=8", "--config.checkpoint_every_steps=8",
           "--config.eval_every_steps=8"]
  out = run_one(eight + [f"--workdir={multi}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                         "--config.mesh.tensor=2"], devices=8)
  assert "Resumed from checkpoint at step 6." in out and "'tensor': 2" in out
  run_one(eight + [f"--workdir={single}"], devices=1)
  a, b = losses(multi), losses(single)
  np.testing.assert_allclose([a[7], a[8]], [b[7], b[8]], rtol=1e-5)


@pytest.mark.parametrize("victim", [0, 1])
def test_a_dead_peer_stops_the_other_within_bounded_time(tmp_path, victim):
  workdir = str(tmp_path)
  procs = two_processes([f"--workdir={workdir}", "--config.total_steps=100000",
                         "--config.checkpoint_every_steps=100000",
                         "--config.eval_every_steps=100000"], free_port(),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    wait_for_logged_steps(workdir, 2, procs)
    procs[victim].kill()
    t0 = time.time()
    survivor = procs[1 - victim]
    code = survivor.wait(timeout=90)  # heartbeat timeout 10 s; a hang fails here
    assert code != 0
    assert time.time() - t0 < 60
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  workdir = str(tmp_path)
  procs = two_processes([f"--workdir={workdir}", "--config.total_steps=100000",
                         "--config.checkpoint_every_steps=100000",
                         "--config.eval_every_steps=100000",
                         "--config.preemption_check_every_steps=5"], free_port(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    wait_for_logged_steps(workdir, 2, procs)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [42, 42], outs[0][-2000:] + outs[1][-2000:]
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
    assert len(saved) == 1 and saved[0] % 5 == 0
    assert f"checkpoint saved at step {saved[0]}" in outs[0]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def test_two_process_evaluation_matches_one_process(trained_quickstart, tmp_path):
  """`python -m igpt_jax.evaluate` as two processes (2 CPU devices each): each keeps its own
  copy of the streamed features, the probe is fit across both processes' devices, and it
  matches the one-process evaluation's."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  runs = {}
  for name in ("single", "multi"):
    runs[name] = str(tmp_path / name)
    shutil.copytree(trained_quickstart, runs[name], ignore=shutil.ignore_patterns("eval"))
  cmd = tool_command("evaluate", "--config=configs/quickstart.py",
                     "--config.eval.tasks=linear_probe", "--config.eval.layers=2",
                     "--config.eval.raw_pixel_baseline=False")
  out = forked.run(cmd + [f"--workdir={runs['single']}"], cwd=REPO, env=env_for(4),
                   capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  port = free_port()
  procs = [forked.popen(
      cmd + [f"--workdir={runs['multi']}"], cwd=REPO, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env=env_for(2, IGPT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", IGPT_NUM_PROCESSES=2,
                  IGPT_PROCESS_ID=rank, IGPT_HEARTBEAT_TIMEOUT_S=10)) for rank in (0, 1)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
  results = {}
  for name, workdir in runs.items():
    with open(os.path.join(workdir, "eval", "linear_probe.json")) as f:
      results[name] = json.load(f)
  for layer in ("2",):
    multi, single = results["multi"]["layers"][layer], results["single"]["layers"][layer]
    # The probe is split over the 4 devices of both runs; across processes its sums are added
    # in another order, so a fit capped at its iterations can end a hair away: a few examples.
    assert multi["l2"] == single["l2"]
    for key in ("val_acc", "test_acc"):
      assert abs(multi[key] - single[key]) <= 0.01, (layer, key, multi[key], single[key])
  copies = os.listdir(os.path.join(runs["multi"], "eval", "features"))
  assert sum(c.endswith(".process1") for c in copies) == 3  # train, validation and test


@pytest.mark.parametrize("env, phrase", [
    # process 0 alone: its peer never comes; one line at the stated timeout, not jax's abort
    (dict(IGPT_NUM_PROCESSES="2", IGPT_PROCESS_ID="0", IGPT_INIT_TIMEOUT_S="5"),
     "process 0 of 2 waited 5 s at coordinator 127.0.0.1:"),
    (dict(IGPT_NUM_PROCESSES="2", IGPT_PROCESS_ID="0", IGPT_COORDINATOR_ADDRESS="127.0.0.1"),
     "coordinator address '127.0.0.1' needs a port"),
    (dict(IGPT_DISTRIBUTED_AUTO="1"), "with IGPT_DISTRIBUTED_AUTO=1, which needs a cluster"),
])
def test_multi_process_start_up_fails_in_one_line(tmp_path, env, phrase):
  env = dict(env_for(1), **env)
  env.setdefault("IGPT_COORDINATOR_ADDRESS", f"127.0.0.1:{free_port()}")
  if "IGPT_DISTRIBUTED_AUTO" in env:
    del env["IGPT_COORDINATOR_ADDRESS"]
  t0 = time.time()
  out = run_tool("main", "--config=configs/quickstart.py", f"--workdir={tmp_path}", env=env,
                 timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  assert time.time() - t0 < 60
  errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and phrase in errors[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr and "Fatal Python error" not in out.stderr
