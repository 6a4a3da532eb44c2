"""Scale-out pieces that need no second machine: gradient accumulation, the memory planner,
multi-process settings, and the launch scripts' dry runs."""

import functools
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import run_tool
from conftest import run_on_fake_devices
from conftest import tiny_config
from igpt_jax import distributed
from igpt_jax import model as model_lib
from igpt_jax import sharding
from igpt_jax import train
from igpt_jax import train_state


def test_gradient_accumulation_equals_the_full_batch():
  config = tiny_config()
  model, schedule, tx = train_state.model_and_optimizer(config, 2)
  mesh = sharding.make_mesh(config)
  lr_args = train_state.lr_args(config, 2, mesh)
  state, _ = train_state.create_train_state(model, tx, mesh, config, seed=0)
  # A non-zero head, so that the loss and every gradient depend on the whole model.
  params = dict(state.params)
  params["wtet"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), params["wtet"].shape)
  state = state.replace(params=params)
  # Two steps each: the first one's learning rate is 0 (warmup starts at 0; optax counts its
  # own steps), so only after the second have the parameters moved; comparing them after one
  # step would be vacuous.
  assert float(schedule(0)) == 0 and float(schedule(1)) > 0
  batch = {"tokens": jax.random.randint(jax.random.PRNGKey(2), (16, 256), 0, 64)}
  out = {}
  for k in (1, 4):  # 4 micro-batches of 4 against one of 16
    step = jax.jit(functools.partial(
        train.train_step, apply_fn=model_lib.make_apply_fn(model),
        make_tx=functools.partial(train_state.make_optimizer, config),
        objective="next_pixel", mask_prob=0.15, seed=0, accum_steps=k))
    with sharding.use(mesh, config):
      new_state, _ = step(state, batch, lr_args)
      new_state, metrics = step(new_state, batch, lr_args)
    out[k] = (metrics, new_state.params)
  moved = [float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(out[1][1]), jax.tree_util.tree_leaves(params))]
  assert min(moved) > 1e-5, moved  # every parameter took a real step
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(out[4][0][key], out[1][0][key], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(out[4][1]), jax.tree_util.tree_leaves(out[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(out[1][0]["loss"]) != pytest.approx(np.log(64), abs=1e-3)


PLAN_SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
from igpt_jax import planner
from conftest import tiny_config
out = {}
for name, mesh in {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "2x2x2": (2, 2, 2)}.items():
  c = tiny_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
                     "model.remat_policy": "full"})
  out[name] = planner.plan(c, hbm_gib=1.0, costs=False)
print("PLAN" + json.dumps(out))
"""


def test_memory_plan_compiles_on_fake_devices_and_sees_fsdp():
  plans = run_on_fake_devices(PLAN_SCRIPT, tag="PLAN")
  n = plans["data8"]["parameters"]
  assert n == 2 * (12 * 64 * 64 + 2 * 64) + 64 * 64 + 64 * 256 + 64 * 64 + 2 * 64 == 123_264
  # Replicated over `data`, each device holds every float32 parameter; FSDP over 8 holds ~1/8.
  assert plans["data8"]["params_gib_per_device"] * 2**30 == pytest.approx(4 * n)
  ratio = plans["fsdp8"]["params_gib_per_device"] / plans["data8"]["params_gib_per_device"]
  assert 0.12 <= ratio < 0.2, ratio
  # Adam keeps two moments, sharded like the parameters.
  for p in plans.values():
    assert p["optimizer_gib_per_device"] == pytest.approx(2 * p["params_gib_per_device"],
                                                          rel=0.01)
    assert p["temp_gib_per_device"] > 0 and p["fits"] and p["devices"] == 8
    # A resume holds one train state (restored into its shards), not a fresh one beside it.
    assert p["restore_peak_gib_per_device"] == pytest.approx(
        p["params_gib_per_device"] + p["optimizer_gib_per_device"])
  assert plans["2x2x2"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}


def _plan_quickstart(*flags):
  return run_tool("plan", "--config=configs/quickstart.py", *flags, timeout=300)


def test_plan_cli():
  fsdp4 = ("--devices=4", "--config.mesh.fsdp=4", "--config.mesh.data=1")
  out = _plan_quickstart(*fsdp4, "--hbm_gib=0.004")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "800,000 parameters on 4 x cpu (data 1 x fsdp 4 x tensor 1)" in out.stdout
  assert "figures from XLA:CPU" in out.stdout and "attention blockwise" in out.stdout
  assert "DOES NOT FIT in 0.004 GiB" in out.stdout  # the step's temporaries do not fit
  assert "restore peak 0.00 GiB per device (one train state" in out.stdout
  as_json = _plan_quickstart(*fsdp4, "--hbm_gib=0.004", "--json")
  assert as_json.returncode == 0, as_json.stderr[-3000:]
  p = json.loads(as_json.stdout.strip().splitlines()[-1])
  assert p["parameters"] == 800_000 and p["fits"] is False and p["hbm_gib"] == 0.004
  assert p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  # FLOPs read from the compiled program, the layer loop counted 4 times: the model's count
  # (flops.py) within what remat-free overheads add; no roofline for a CPU (no chip row).
  assert 0.9 < p["flop_ratio"] < 1.3 and p["loops_counted_once"] == 0
  assert p["hbm_gb_per_device"] > 0 and "roofline_step_s" not in p
  # Parameters and Adam alone over HBM: said without compiling.
  tiny = _plan_quickstart(*fsdp4, "--hbm_gib=0.001")
  assert tiny.returncode == 0, tiny.stderr[-3000:]
  assert "parameters and optimizer state alone take 0.00" in tiny.stdout
  assert "(not compiled)" in tiny.stdout
  bad = _plan_quickstart("--devices=3")
  assert bad.returncode == 2 and "batch_size=64" in bad.stderr and "Traceback" not in bad.stderr


def test_sampler_plan_cli():
  """--sample_batch plans the key/value-cached sampler: its cache per device follows the mesh
  (images over data, heads over tensor), FLOPs are read from the program with each decoding
  loop counted as often as it runs; a batch the mesh cannot split and a masked-pixel config
  are refused in one line."""
  mesh = ("--devices=4", "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2")
  out = _plan_quickstart(*mesh, "--sample_batch=8", "--json")
  assert out.returncode == 0, out.stderr[-3000:]
  p = json.loads(out.stdout.strip().splitlines()[-1])
  # configs/quickstart.py: 4 layers x 128, 4 heads of 32, 8x8 images (64 pixels), float32.
  assert p["program"] == "sampler" and p["positions"] == 64
  assert p["kv_cache_gib_per_device"] * 2**30 == 2 * 4 * (8 // 2) * 64 * (4 // 2) * 32 * 4
  assert p["temp_gib_per_device"] >= p["kv_cache_gib_per_device"] and p["fits"]
  assert p["loops_counted_once"] == 0
  # Blocks of 32 positions attend over whole blocks: a little more than the causal count.
  assert 1.0 <= p["compiler_tflop_per_device"] / p["model_tflop_per_device"] < 1.3
  assert p["comm_gb_per_device"]  # heads over tensor: the attention output is summed
  text = _plan_quickstart(*mesh, "--sample_batch=8")
  assert ("sampler of 800,000 parameters on 4 x cpu (data 2 x fsdp 1 x tensor 2): 8 images "
          "of 8x8 (64 pixels each, decoded in blocks of 32)") in text.stdout, text.stdout
  bad = _plan_quickstart(*mesh, "--sample_batch=3")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "multiple of the mesh's data x fsdp size (2)" in bad.stderr
  bert = _plan_quickstart(*mesh, "--sample_batch=8", "--config.objective=masked_pixel")
  assert bert.returncode == 2 and "iterative infilling" in bert.stderr, bert.stderr[-2000:]


# --- multi-process settings -----------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch):
  for k in ("IGPT_COORDINATOR_ADDRESS", "IGPT_NUM_PROCESSES", "IGPT_PROCESS_ID",
            "IGPT_DISTRIBUTED_AUTO", "SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def test_distributed_settings(clean_env):
  assert distributed.initialize_kwargs(distributed.settings_from_env()) is None  # one process
  clean_env.setenv("IGPT_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  clean_env.setenv("IGPT_NUM_PROCESSES", "4")
  with pytest.raises(ValueError, match="incomplete.*process_id=None"):
    distributed.initialize_kwargs(distributed.settings_from_env())
  kw = distributed.initialize_kwargs(distributed.settings_from_env(process_id=3))
  assert kw["coordinator_address"] == "10.0.0.1:1234" and kw["num_processes"] == 4
  assert kw["process_id"] == 3 and kw["heartbeat_timeout_seconds"] == 100
  with pytest.raises(ValueError, match=r"process_id=4 must be in \[0, num_processes=4\)"):
    distributed.initialize_kwargs(distributed.settings_from_env(process_id=4))
  clean_env.setenv("IGPT_NUM_PROCESSES", "four")
  with pytest.raises(ValueError, match="IGPT_NUM_PROCESSES='four'"):
    distributed.settings_from_env()


def test_cluster_detection(clean_env):
  clean_env.setenv("SLURM_JOB_ID", "77")
  clean_env.setenv("SLURM_NTASKS", "1")
  assert distributed.detected_cluster() is None
  clean_env.setenv("SLURM_NTASKS", "16")
  assert distributed.detected_cluster() == "slurm"
  assert "coordinator_address" not in distributed.initialize_kwargs(distributed.settings_from_env())
  clean_env.delenv("SLURM_NTASKS")
  clean_env.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert distributed.detected_cluster() == "tpu"


# --- launch scripts ---------------------------------------------------------------------------

def sh(args, **env):
  return subprocess.run(["bash"] + args, cwd=REPO, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **env))


def test_tpu_pod_dry_run():
  out = sh(["launch/tpu_pod.sh", "--name", "igpt-l", "--zone", "us-central2-b", "--create",
            "v4-256", "--spot", "--dry-run", "--", "python", "-m", "igpt_jax.main",
            "--config=configs/l.py", "--workdir=gs://bucket/igpt_l"])
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.startswith("+ ")]
  assert "tpu-vm create igpt-l --zone us-central2-b --accelerator-type v4-256" in lines[0]
  assert "--spot" in lines[0]
  assert any("scp" in l and "--worker=all" in l for l in lines)
  # The printed commands are shell-quoted (printf %q): spaces appear as "\ ".
  assert "pip\\ install\\ -q\\ -e\\ ." in lines[-2] and "jax\\[tpu\\]" in lines[-2]
  assert "--worker=all" in lines[-1] and "IGPT_DISTRIBUTED_AUTO=1" in lines[-1]
  assert "--workdir=gs://bucket/igpt_l" in lines[-1]
  assert "Usage: launch/tpu_pod.sh" in sh(["launch/tpu_pod.sh", "--help"]).stdout


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--", "x"], "no TPU name"),
    (["--name", "n", "--", "x"], "no zone"),
    (["--name", "n", "--zone", "z"], "no command after --"),
    (["--name", "n", "--zone", "z", "--bogus"], "unknown option --bogus"),
    (["--name"], "--name needs a value"),
    (["--name", "n", "--zone", "--spot", "--", "x"], "--zone needs a value"),
    # A --dry-run after -- would reach the command, and the command would really run.
    (["--name", "n", "--zone", "z", "--", "python", "-m", "igpt_jax.main", "--dry-run"],
     "--dry-run comes after --"),
])
def test_tpu_pod_fails_clearly(args, message):
  out = sh(["launch/tpu_pod.sh"] + args, TPU_NAME="", TPU_ZONE="")
  assert out.returncode == 2 and message in out.stderr


@pytest.mark.parametrize("tpu, topology, hosts, chips_per_host, accelerator", [
    ("v5e", "16x16", 64, 4, "tpu-v5-lite-podslice"),  # v5e-256
    ("v4", "4x4x4", 16, 4, "tpu-v4-podslice"),  # v4-128 (64 chips)
    ("v5e", "2x4", 1, 8, "tpu-v5-lite-podslice"),  # one 8-chip host
])
def test_gke_jobset_renders(tpu, topology, hosts, chips_per_host, accelerator):
  """The GKE launcher's manifest: one pod per TPU host asking for all its chips, on the slice's
  node pool, running the command unchanged (quoting survives YAML and bash -c)."""
  import yaml  # pylint: disable=g-import-not-at-top
  command = ["python", "-m", "igpt_jax.main", "--config=configs/l.py",
             "--workdir=gs://bucket/igpt l", "--config.mesh.fsdp=128", "it's \"quoted\""]
  out = sh(["launch/gke_tpu.sh", "--name", "igpt-l", "--tpu", tpu, "--topology", topology,
            "--image", "us-docker.pkg.dev/p/r/igpt:1", "--spot", "--env", "WANDB_MODE=off line",
            "--max-restarts", "5", "--dry-run", "--"] + command)
  assert out.returncode == 0, out.stderr
  jobset = yaml.safe_load(out.stdout)
  assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "igpt-l"
  assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 5
  assert jobset["spec"]["network"]["enableDNSHostnames"] is True
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == hosts
  assert job["completionMode"] == "Indexed"
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                 "cloud.google.com/gke-tpu-topology": topology,
                                 "cloud.google.com/gke-spot": "true"}
  container = pod["containers"][0]
  assert container["image"] == "us-docker.pkg.dev/p/r/igpt:1"
  assert container["resources"]["limits"]["google.com/tpu"] == chips_per_host
  env = {e["name"]: e["value"] for e in container["env"]}
  assert env == {"IGPT_DISTRIBUTED_AUTO": "1", "WANDB_MODE": "off line"}
  # What the pod's bash runs, with `exec` swapped for printing each argument on its own line.
  script = container["args"][0].replace("exec ", "printf '%s\\n' ", 1)
  assert container["command"] == ["bash", "-c"] and "IGPT_DISTRIBUTED_AUTO=1" in script
  printed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
  assert printed.stdout.splitlines() == command


@pytest.mark.parametrize("args, message", [
    (["--tpu", "v5e", "--topology", "16x16", "--image", "i", "--", "x"], "no job name"),
    (["--name", "Big", "--tpu", "v5e", "--topology", "16x16", "--image", "i", "--", "x"],
     "lower case"),
    (["--name", "n", "--tpu", "v3", "--topology", "4x4", "--image", "i", "--", "x"],
     "use v4, v5e, v5p or v6e"),
    (["--name", "n", "--tpu", "v4", "--topology", "16x16", "--image", "i", "--", "x"],
     "has 3 dimensions"),
    (["--name", "n", "--tpu", "v5e", "--topology", "16x16", "--", "x"], "no image"),
    (["--name", "n", "--tpu", "v5e", "--topology", "16x16", "--image", "i"], "no command"),
    (["--name", "n", "--tpu", "v5e", "--topology", "0x4", "--image", "i", "--", "x"],
     "every dimension must be at least 1"),
    (["--name", "n", "--tpu", "v5e", "--topology", "3x5", "--image", "i", "--", "x"],
     "15 chips, not a whole number of 4-chip v5e hosts"),
    (["--name", "n", "--tpu", "v5e", "--topology", "4x4", "--image", "reg/img: 1", "--", "x"],
     "is not a container image reference"),
    (["--name", "n", "--tpu", "v5e", "--topology", "4x4", "--image", "i", "--dry-run", "--",
      "x", "--dry-run"], "--dry-run comes after --"),
    (["--name", "n", "--tpu"], "--tpu needs"),
])
def test_gke_launcher_fails_clearly(args, message):
  out = sh(["launch/gke_tpu.sh"] + args, IGPT_JOB_NAME="", IGPT_TPU="", IGPT_TOPOLOGY="",
           IGPT_IMAGE="")
  assert out.returncode == 2 and message in out.stderr, out.stderr
  assert "Usage: launch/gke_tpu.sh" in sh(["launch/gke_tpu.sh", "--help"]).stdout


def test_slurm_dry_run_and_missing_variables():
  env = dict(IGPT_DRY_RUN="1", IGPT_CONFIG="configs/l.py", IGPT_WORKDIR="/shared/igpt_l",
             SLURM_JOB_NODELIST="gpu[01-04]", SLURM_NTASKS="32", IGPT_COORDINATOR_HOST="gpu01")
  out = sh(["launch/slurm_gpu.sbatch", "--config.total_steps=10"], **env)
  assert out.returncode == 0, out.stderr
  assert "coordinator gpu01:12355, 32 processes" in out.stdout
  cmd = out.stdout.splitlines()[-1]
  assert cmd.startswith("+ srun --kill-on-bad-exit=1 bash -c")
  for part in ("IGPT_PROCESS_ID=\\$SLURM_PROCID", "CUDA_VISIBLE_DEVICES=\\$SLURM_LOCALID",
               "IGPT_COORDINATOR_ADDRESS=gpu01:12355", "--config=configs/l.py",
               "--workdir=/shared/igpt_l", "--config.total_steps=10"):
    assert part in cmd, (part, cmd)
  missing = dict(env, IGPT_WORKDIR="")
  out = sh(["launch/slurm_gpu.sbatch"], **missing)
  assert out.returncode != 0 and "set IGPT_WORKDIR" in out.stderr
  out = sh(["launch/slurm_gpu.sbatch"], **dict(env, SLURM_JOB_NODELIST=""))
  assert out.returncode != 0 and "not inside a SLURM job" in out.stderr
