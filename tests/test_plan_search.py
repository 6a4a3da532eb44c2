"""`plan --search`: the candidates it tries, the order it tries them in, its ranking, its cache,
and a real search with the GPU compiler."""

import json
import os

import pytest

from conftest import quickstart_config, requires_gpu_compiler
from conftest import run_tool
from igpt_jax import plan_search


def test_meshes_split_each_micro_batch_evenly():
  assert plan_search.meshes(8, 128, 1, max_tensor=1) == [(1, 8, 1), (2, 4, 1), (4, 2, 1),
                                                         (8, 1, 1)]
  # 256 chips cannot split a batch of 128 by data x fsdp alone: tensor parallelism is needed.
  assert all(m[2] >= 2 for m in plan_search.meshes(256, 128, 1))
  assert (1, 128, 2) in plan_search.meshes(256, 128, 1)
  # Two micro-batches of 64 need data x fsdp to divide 64.
  assert (1, 128, 1) not in plan_search.meshes(128, 128, 2)
  assert plan_search.chips_in("v5e:16x16") == 256 and plan_search.chips_in("h100:2x8") == 16


class FakeCompiler:
  """Stands in for planner.plan: a step fits when the activations per device (batch per device,
  shrunk by remat, micro-batches and tensor parallelism) and the replicated weights fit; its
  time falls with fewer weight gathers (more data parallelism) and rises with remat."""

  def __init__(self):
    self.calls = []

  def __call__(self, c, devices, eval_forward):
    mesh = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    self.calls.append((mesh, c.model.remat_policy, c.grad_accum_steps))
    chips = mesh[0] * mesh[1] * mesh[2]
    per_device = c.batch_size / (mesh[0] * mesh[1]) / c.grad_accum_steps / mesh[2]
    shrink = {"none": 1.0, "dots_saveable": 0.25, "full": 0.1}[c.model.remat_policy]
    gib = per_device * shrink + 8.0 * mesh[0] / chips
    step = (1.0 + 0.2 * (c.model.remat_policy == "full")) * 64 / chips * (1 + 0.5 / mesh[0])
    return {"fits": gib <= 16, "total_gib_per_device": gib, "usable_gib": 16.0,
            "hbm_headroom": 1 - gib / 16,
            "compile_s": 1.0, "roofline_step_s": step, "bound_by": "compute",
            "mfu_bound": 0.5, "flop_ratio": 1.0, "compiler": "fake"}


def test_search_climbs_the_ladder_and_the_data_axis_and_ranks_by_chip_hours():
  fake = FakeCompiler()
  c = quickstart_config()
  with c.unlocked():
    c.batch_size, c.total_steps = 128, 1000
  result = plan_search.search(c, "v5e", plan_fn=fake, devices_fn=lambda t: None,
                              slices=["v5e:2x2", "v5e:2x4"], log=lambda m: None)
  # The slice nearer to 2 images per chip comes first (16 per chip on 8 chips, then 32 on 4).
  assert fake.calls[0] == ((1, 8, 1), "none", 1)
  four = [call for call in fake.calls if call[0][0] * call[0][1] * call[0][2] == 4]
  # 4 chips, pure FSDP: 32 images per chip do not fit without remat; dots_saveable does.
  assert four[:2] == [((1, 4, 1), "none", 1), ((1, 4, 1), "dots_saveable", 1)]
  # From there the data axis doubles while it pays, starting at the rung that fitted.
  assert four[2] == ((2, 2, 1), "dots_saveable", 1)
  assert all(call[0][2] == 1 for call in fake.calls)  # no tensor parallelism was needed
  # Pure data parallelism with dots_saveable fills all 16 GiB: under the 10% headroom asked
  # for, so the next rung (2 micro-batches) is tried and kept.
  assert ((4, 1, 1), "dots_saveable", 1) in fake.calls
  assert any(r["mesh"] == [4, 1, 1] and r["micro_batches"] == 2 for r in result["rows"])
  hours = [r["chip_hours"] for r in result["rows"]]
  assert hours == sorted(hours) and result["rows"][0]["topology"] == "v5e:2x4"
  assert plan_search.promising_first(["v5e:2x2", "v5e:8x8", "v5e:16x16", "v5e:4x8"], 128) == [
      "v5e:8x8", "v5e:4x8", "v5e:16x16", "v5e:2x2"]
  assert result["tried"] == len(fake.calls) and not result["left"]


def test_an_hbm_bound_step_without_remat_is_compared_with_dots_saveable():
  """Without remat every activation is written and read back: where that makes the step
  HBM-bound, dots_saveable (which keeps fewer) can be faster, so both are compiled."""
  class HbmBound(FakeCompiler):
    def __call__(self, c, devices, eval_forward):
      p = super().__call__(c, devices, eval_forward)
      p["bound_by"] = "HBM" if c.model.remat_policy == "none" else "compute"
      p["roofline_step_s"] *= 1.5 if c.model.remat_policy == "none" else 1.0
      return p
  fake = HbmBound()
  c = quickstart_config()
  with c.unlocked():
    c.batch_size, c.total_steps = 16, 1000
  result = plan_search.search(c, "v5e", plan_fn=fake, devices_fn=lambda t: None,
                              slices=["v5e:2x4"], log=lambda m: None)
  assert fake.calls[:2] == [((1, 8, 1), "none", 1), ((1, 8, 1), "dots_saveable", 1)]
  assert result["rows"][0]["remat"] == "dots_saveable"


def test_search_stops_at_its_time_budget_and_says_which_slices_are_left():
  c = quickstart_config()
  with c.unlocked():
    c.batch_size = 128
  result = plan_search.search(c, "v5e", plan_fn=FakeCompiler(), devices_fn=lambda t: None,
                              budget_s=0.0, log=lambda m: None)
  assert result["tried"] == 0 and result["left"][0] == "v5e:8x8"  # 2 images per chip
  report = plan_search.report(result, "configs/quickstart.py", [], 1000)
  assert "time budget ran out" in report and "Nothing fits" in report


def test_search_with_the_gpu_compiler_and_its_cache(tmp_path):
  """A real search (iGPT-S, 2 layers, bfloat16) over one and two hosts of 8 H100s: every
  candidate compiled by XLA:GPU, the best printed as a command; a second search reads every
  plan from the cache."""
  requires_gpu_compiler()
  cmd = ["--config=configs/s.py", "--search=h100", "--max_chips=16",
         "--config.model.num_layers=2", "--config.model.dtype=bfloat16",
         f"--cache_dir={tmp_path}"]
  first = run_tool("plan", *cmd, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "| 1 | h100:" in first.stdout and "XLA:GPU" in first.stdout
  best = [l for l in first.stdout.splitlines() if l.startswith("Best: ")]
  assert best and "--config.model.num_layers=2" in best[0] and "--topology=h100:" in best[0]
  cached = len(list(tmp_path.glob("plan-*.json")))
  assert cached >= 2
  again = run_tool("plan", *cmd, "--json", timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  result = json.loads(again.stdout.strip().splitlines()[-1])
  assert len(list(tmp_path.glob("plan-*.json"))) == cached  # nothing new compiled
  assert result["rows"] and all(r["compiler"] == "XLA:GPU" for r in result["rows"])
  assert result["rows"][0]["chip_hours"] == min(r["chip_hours"] for r in result["rows"])


@pytest.mark.parametrize("flags, phrase", [
    (["--search=v9"], "chip kinds are"),
    (["--search=v5e", "--max_chips=2"], "--max_chips=2"),
])
def test_search_flags_fail_in_one_line(flags, phrase):
  out = run_tool("plan", "--config=configs/s.py", *flags, timeout=300)
  assert out.returncode == 2 and phrase in out.stderr and "Traceback" not in out.stderr


def test_cached_plans_are_keyed_by_the_code_that_made_them(tmp_path):
  """A plan cached by other code (a changed planner, model or mesh builder) is not served: the
  cache key holds a digest of the package's sources, which any edit changes."""
  import shutil  # pylint: disable=g-import-not-at-top
  package = os.path.dirname(plan_search.__file__)
  copy = tmp_path / "igpt_jax"
  shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
  assert plan_search.code_digest(str(copy)) == plan_search.code_digest(package)
  assert plan_search._versions()["igpt_jax"] == plan_search.code_digest(package)  # pylint: disable=protected-access
  with open(copy / "sharding.py", "a") as f:
    f.write("\n# edited\n")
  assert plan_search.code_digest(str(copy)) != plan_search.code_digest(package)

