"""Reading a compiled program: FLOPs with loops counted as often as they run, and the bytes each
collective sends, against figures computed by hand."""

import pytest
from conftest import run_on_fake_devices

from igpt_jax import hlo_cost

# Eight fake CPU devices; small programs whose collectives are known in advance. Each entry is
# the per-device bytes sent by kind, from the cost reader.
COLLECTIVES_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from igpt_jax import hlo_cost

mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
shard = lambda *spec: NamedSharding(mesh, P(*spec))
rep = shard()

def sent(fn, *args, out=None):
  compiled = jax.jit(fn, out_shardings=out).lower(*args).compile()
  cost = hlo_cost.analyze(compiled.as_text(), 8)
  by_kind = {}
  for c in cost.collectives:
    by_kind[c.kind] = by_kind.get(c.kind, 0.0) + c.bytes_sent * c.count
  return {"sent": by_kind, "flops": cost.flops, "loops": [l[1] for l in cost.loops]}

S = jax.ShapeDtypeStruct
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
  from jax.experimental.shard_map import shard_map
smap = lambda f, i, o: shard_map(f, mesh=mesh, in_specs=i, out_specs=o)
out = {}
# FSDP: each device holds 1/8 of the weight's rows and gathers the rest for its matmul.
out["fsdp"] = sent(smap(lambda x, w: x @ jax.lax.all_gather(w, "d", tiled=True),
                        (P("d", None), P("d", None)), P("d", None)),
                   S((64, 256), jnp.float32, sharding=shard("d", None)),
                   S((256, 512), jnp.float32, sharding=shard("d", None)))
# Data parallel: each device's gradient of the replicated weight, summed over the devices.
# (The gradient of sum((x w)^2) written out: jax.grad would add its own psum.)
out["dp"] = sent(smap(lambda x, w: jax.lax.psum(2 * x.T @ (x @ w), "d"),
                      (P("d", None), P()), P()),
                 S((64, 256), jnp.float32, sharding=shard("d", None)),
                 S((256, 128), jnp.float32, sharding=rep))
# Tensor parallel (Megatron's second matmul): the contracted dimension is split, each device's
# partial product is summed over the devices and scattered by rows.
out["tp"] = sent(smap(lambda x, w: jax.lax.psum_scatter(x @ w, "d", tiled=True),
                      (P(None, "d"), P("d", None)), P("d", None)),
                 S((64, 256), jnp.float32, sharding=shard(None, "d")),
                 S((256, 128), jnp.float32, sharding=shard("d", None)))
# A ring shift (pipeline stages, ring attention): every device sends its block once.
out["permute"] = sent(smap(lambda x: jax.lax.ppermute(x, "d", [(i, (i + 1) % 8)
                                                                for i in range(8)]),
                           P("d"), P("d")), S((8 * 1024,), jnp.float32, sharding=shard("d")))
# A loop of 7 matmuls: 7 x 2 m n k FLOPs, not one.
out["loop"] = sent(lambda x, w: jax.lax.fori_loop(0, 7, lambda i, y: jnp.tanh(y @ w), x),
                   S((32, 64), jnp.float32, sharding=rep), S((64, 64), jnp.float32,
                                                           sharding=rep), out=rep)
print("COST" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def costs():
  return run_on_fake_devices(COLLECTIVES_SCRIPT, tag="COST")


def test_fsdp_all_gather_sends_the_other_shards(costs):
  # An all-gather of P bytes over n devices: each sends its shard to the n - 1 others.
  p, n = 256 * 512 * 4, 8
  assert costs["fsdp"]["sent"] == {"all-gather": pytest.approx(p * (n - 1) / n)}
  assert costs["fsdp"]["flops"] == pytest.approx(2 * (64 // n) * 256 * 512)


def test_data_parallel_all_reduce_of_the_gradient(costs):
  # A ring all-reduce of P bytes: reduce-scatter then all-gather, 2 P (n - 1) / n sent.
  p, n = 256 * 128 * 4, 8
  assert costs["dp"]["sent"] == {"all-reduce": pytest.approx(2 * p * (n - 1) / n)}


def test_tensor_parallel_reduce_scatter(costs):
  p, n = 64 * 128 * 4, 8  # each device's partial product, summed and split over the devices
  assert costs["tp"]["sent"] == {"reduce-scatter": pytest.approx(p * (n - 1) / n)}
  assert costs["tp"]["flops"] == pytest.approx(2 * 64 * (256 // n) * 128)


def test_collective_permute_sends_its_block(costs):
  assert costs["permute"]["sent"] == {"collective-permute": pytest.approx(1024 * 4)}


def test_loops_count_as_often_as_they_run(costs):
  assert 7 in costs["loop"]["loops"]
  assert costs["loop"]["flops"] == pytest.approx(7 * 2 * 32 * 64 * 64)


# A loop as the TPU compiler writes its collective matmuls: no known_trip_count, a condition
# comparing a counter with a constant, a body adding a step, a start set by the loop's input.
LOOP_HLO = """
HloModule m

%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,4]{1,0} get-tuple-element(%p), index=1
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %y = f32[4,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,4]) tuple(%next, %y)
}

%cond (p: (s32[], f32[4,4])) -> pred[] {
  %p = (s32[], f32[4,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %limit = s32[] constant(9)
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

ENTRY %main (a: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %one = s32[] constant(1)
  %init = (s32[], f32[4,4]) tuple(%one, %a)
  %w = (s32[], f32[4,4]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4,4]{1,0} get-tuple-element(%w), index=1
}
"""


def test_trip_count_read_from_the_loop():
  cost = hlo_cost.analyze(LOOP_HLO, 1)
  assert cost.loops == [("body", 4, "condition")]  # i = 1, 3, 5, 7
  assert cost.flops == 4 * 2 * 4 * 4 * 4


def test_iota_replica_groups():
  assert hlo_cost.replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3],
                                                                     [4, 5, 6, 7]]
  assert hlo_cost.replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [
      [0, 4], [1, 5], [2, 6], [3, 7]]
  assert hlo_cost.replica_groups("replica_groups={{0,2},{1,3}}", 4) == [[0, 2], [1, 3]]
  assert hlo_cost.replica_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
  # The named-mesh form (newer XLA): device ids on a mesh, groups along the listed axes.
  assert hlo_cost.replica_groups(
      "replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}", 8) == [
          [0, 1, 2, 3], [4, 5, 6, 7]]
  assert hlo_cost.replica_groups(
      "replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}", 8) == [
          [0, 4], [1, 5], [2, 6], [3, 7]]
