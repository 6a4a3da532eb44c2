"""`plan --search`: which slice, mesh, remat policy and micro-batch count to train a config on.

For a chip kind (v4, v5e, v5p, v6e, h100, h200) it walks the kind's slices (optionally up to a
chip budget, or a given list of slices), the most promising first: those nearest to 2 images
per chip, then outwards, smaller slices before larger at equal distance. On each slice it starts
from pure FSDP (1 x chips x 1) and compiles the train step with the cheapest settings first, moving to
costlier ones only while the step does not fit: no remat, `dots_saveable` (recomputes the
elementwise work), 2 micro-batches, `full` remat (recomputes the forward), then 2 and 4
micro-batches of it. From the first mesh that fits, the data axis doubles (replicas: more
memory, fewer weight gathers) while that lowers the chip-hours; tensor parallelism (2, 4, 8) is
tried only where nothing fits without it, or where the batch cannot be split over all chips.
Every compile is a real one (`planner.plan`, without the evaluation forward) and is cached under
a key of everything that determines the program (the config, the slice, jax's and the
compilers' versions), so a second search, or one with a larger budget, recompiles nothing.

A candidate fits when the compiler accepts it with at least `min_headroom` (default 10%) of the
usable HBM to spare (allocator fragmentation, the input pipeline's buffers, a profiler).
Fitting candidates are ranked by chip-hours for the config's `total_steps` (chips x the step-time
bound), then by the step-time bound. The table and the exact command of the best are printed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import time

from igpt_jax import errors

SLICES = {
    "v5e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v6e": ["2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"],
    "v4": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    "v5p": ["2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"],
    "h100": ["1x8", "2x8", "4x8", "8x8", "16x8"],
    "h200": ["1x8", "2x8", "4x8", "8x8", "16x8"],
}
# (remat policy, micro-batches), cheapest first: the first that fits is the one to use.
IMAGES_PER_CHIP = 2
LADDER = [("none", 1), ("dots_saveable", 1), ("dots_saveable", 2), ("full", 1), ("full", 2),
          ("full", 4)]


def chips_in(topology: str) -> int:
  return math.prod(int(d) for d in topology.split(":", 1)[1].split("x"))


def meshes(chips: int, batch: int, micro: int, max_tensor: int = 8) -> list:
  """(data, fsdp, tensor) over `chips` that split each micro-batch evenly over data x fsdp,
  pure FSDP first, then more data parallelism, then tensor parallelism."""
  out = []
  tensor = 1
  while tensor <= min(max_tensor, chips):
    data = 1
    while data * tensor <= chips:
      if chips % (data * tensor) == 0:
        fsdp = chips // (data * tensor)
        if batch % micro == 0 and (batch // micro) % (data * fsdp) == 0:
          out.append((data, fsdp, tensor))
      data *= 2
    tensor *= 2
  return out


@functools.cache  # one process runs one version of everything
def _versions() -> dict:
  """What a cached plan depends on besides its config and topology: the compilers' versions and
  this package's code (a changed model, planner or mesh builder answers differently)."""
  out = {}
  for dist in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      pass
  out["igpt_jax"] = code_digest(os.path.dirname(os.path.abspath(__file__)))
  return out


def code_digest(package_dir: str) -> str:
  """A digest of the package's Python sources: any change to them gives another."""
  digest = hashlib.sha256()
  for name in sorted(os.listdir(package_dir)):
    if name.endswith(".py"):
      with open(os.path.join(package_dir, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()[:16]


def cache_key(config, topology: str, salt: str = "") -> str:
  blob = json.dumps({"config": json.loads(config.to_json_best_effort()),
                     "topology": topology, "versions": _versions(), "salt": salt},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def candidate(base, mesh: tuple, remat: str, micro: int):
  c = base.copy_and_resolve_references()
  with c.unlocked():
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.model.remat_policy = remat
    c.grad_accum_steps = micro
  return c


def promising_first(topologies: list, batch: int) -> list:
  """Slices in the order worth compiling under a time budget: nearest first to
  `IMAGES_PER_CHIP` images per chip (few enough to fit without remat or micro-batches, enough to
  keep each chip's matmuls large and its weight gathers amortised), then fewer chips first."""
  def distance(t):
    return abs(math.log2(batch / chips_in(t)) - math.log2(IMAGES_PER_CHIP))
  return sorted(topologies, key=lambda t: (distance(t), chips_in(t)))


def command(config_path: str, topology: str, mesh: tuple, remat: str, micro: int,
            extra: list) -> str:
  parts = [f"--config={config_path}", *extra, f"--config.mesh.data={mesh[0]}",
           f"--config.mesh.fsdp={mesh[1]}", f"--config.mesh.tensor={mesh[2]}",
           f"--config.model.remat_policy={remat}", f"--config.grad_accum_steps={micro}"]
  return f"python -m igpt_jax.plan --topology={topology} " + " ".join(parts)


def search(base, kind: str, *, plan_fn, devices_fn, slices=None, max_chips: int = 0,
           budget_s: float = 1800, cache_dir: str | None = None, min_headroom: float = 0.1,
           cache_salt: str = "", log=print) -> dict:
  """Compiles candidates (`plan_fn(config, devices=...)`, devices from `devices_fn(topology)`:
  planner.topology_devices; `cache_salt`: whatever else changes its answer, such as the HBM
  assumed) until the search is done or `budget_s` is spent;
  returns {"rows": [...fitting, ranked], "tried": n, "skipped": n, "left": [slices]}.

  On each slice: for tensor = 1, 2, 4, 8 (the next only while nothing fits), pure FSDP first,
  each mesh climbing the ladder of settings to the first that fits; from a mesh that fits, the
  data axis doubles while that lowers the chip-hours (replicas trade memory for fewer gathers).
  """
  from igpt_jax import config_lib  # pylint: disable=g-import-not-at-top
  kind = kind.lower()
  if slices:
    topologies = list(slices)
  elif kind in SLICES:
    topologies = [f"{kind}:{s}" for s in SLICES[kind]]
  else:
    raise errors.FlagError(f"--search={kind}: chip kinds are {sorted(SLICES)} (or give "
                           "--slices=v5e:8x8,v5e:16x16).")
  if max_chips:
    topologies = [t for t in topologies if chips_in(t) <= max_chips]
  if not topologies:
    raise errors.FlagError(f"--max_chips={max_chips}: no slice of those is that small.")
  topologies = promising_first(topologies, base.batch_size)
  start = time.time()
  state = {"rows": [], "tried": 0, "skipped": 0, "left": []}
  devices_of = {}

  def compile_one(topology, mesh, remat, micro):
    c = candidate(base, mesh, remat, micro)
    path = (os.path.join(cache_dir, f"plan-{cache_key(c, topology, cache_salt)}.json") if cache_dir
            else None)
    if path and os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    if topology not in devices_of:
      devices_of[topology] = devices_fn(topology)
    try:
      p = plan_fn(c, devices=devices_of[topology], eval_forward=False)
    except config_lib.ConfigError as e:  # a mesh this slice's torus cannot hold
      p = {"refused": str(e)}
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(p, f)
      os.replace(path + ".tmp", path)
    return p

  def climb(topology, mesh, first_rung=0):
    """The first rung of the ladder at which `mesh` fits: (row, rung), or (None, None). Where
    that is no remat and the step is bound by HBM traffic, the next rung too (dots_saveable
    keeps fewer activations, so it can move less), and the better of the two."""
    chips = chips_in(topology)
    found = None
    for rung, (remat, micro) in enumerate(LADDER):
      if rung < first_rung or mesh not in meshes(chips, base.batch_size, micro):
        continue
      if time.time() - start > budget_s:
        raise TimeoutError
      p = compile_one(topology, mesh, remat, micro)
      state["tried"] += 1
      label = f"{topology} mesh {'x'.join(map(str, mesh))}, remat {remat}, {micro} micro-batch"
      head = f"  [{state['tried']}, {time.time() - start:.0f}s] {label}"
      if "refused" in p:
        state["skipped"] += 1
        log(f"{head}: refused ({p['refused'][:300]})")
        return found or (None, None)
      if p["fits"] and p.get("hbm_headroom", 1.0) < min_headroom:
        log(f"{head}: fits with {100 * p['hbm_headroom']:.0f}% of HBM to spare, under the "
            f"{100 * min_headroom:.0f}% asked for (--min_headroom)")
        if found:
          return found
        continue
      if not p["fits"]:
        why = p.get("compiler_says") or f"{p['total_gib_per_device']:.1f} GiB"
        log(f"{head}: does not fit ({why[:120]})")
        if found or p.get("compile_s") == 0.0:  # Adam and parameters alone: nothing helps
          return found or (None, None)
        continue
      step = p.get("roofline_step_s")
      row = {"topology": topology, "chips": chips, "mesh": list(mesh), "remat": remat,
             "micro_batches": micro, "gib": p["total_gib_per_device"],
             "usable_gib": p["usable_gib"], "step_s": step, "bound_by": p.get("bound_by"),
             "mfu": p.get("mfu_bound"), "flop_ratio": p.get("flop_ratio"),
             "chip_hours": chips * step * base.total_steps / 3600 if step else float("inf"),
             "compiler": p["compiler"]}
      state["rows"].append(row)
      log(f"{head}: fits, {row['gib']:.1f} GiB, step >= {1e3 * step:.0f} ms "
          f"({row['bound_by']}), MFU <= {100 * row['mfu']:.0f}%, "
          f"{row['chip_hours']:,.0f} chip-hours")
      if found:
        return min(found, (row, rung), key=lambda f: f[0]["chip_hours"])
      if remat != "none" or row["bound_by"] != "HBM":
        return row, rung
      found = (row, rung)
    return found or (None, None)

  for i, topology in enumerate(topologies):
    chips = chips_in(topology)
    try:
      for tensor in (1, 2, 4, 8):
        fsdp_first = [m for m in meshes(chips, base.batch_size, 1, max_tensor=tensor)
                      if m[2] == tensor]
        options = sorted({m for _, micro in LADDER
                          for m in meshes(chips, base.batch_size, micro, max_tensor=tensor)
                          if m[2] == tensor}, key=lambda m: m[0])
        if not options:
          continue
        row, rung = climb(topology, (fsdp_first or options)[0])
        if row is None:
          continue  # more tensor parallelism splits the activations further
        for mesh in options[options.index(tuple(row["mesh"])) + 1:]:
          more, more_rung = climb(topology, mesh, rung)
          if more is None or more["chip_hours"] >= row["chip_hours"]:
            break
          row, rung = more, more_rung
        break
    except TimeoutError:
      state["left"] = topologies[i:]
      break
  state["rows"].sort(key=lambda r: (r["chip_hours"], r["step_s"] or 0))
  return state


def format_table(result: dict, total_steps: int, top: int = 12) -> str:
  lines = [f"| rank | slice | chips | mesh (data × fsdp × tensor) | remat | micro-batches | "
           f"GiB / device (usable) | step ≥ (set by) | MFU ≤ | chip-hours for {total_steps:,} "
           "steps | compiler |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for i, r in enumerate(result["rows"][:top], 1):
    lines.append(
        f"| {i} | {r['topology']} | {r['chips']} | {' × '.join(map(str, r['mesh']))} | "
        f"{r['remat']} | {r['micro_batches']} | {r['gib']:.1f} ({r['usable_gib']:.3g}) | "
        f"{1e3 * r['step_s']:.0f} ms ({r['bound_by']}) | {100 * r['mfu']:.0f}% | "
        f"{r['chip_hours']:,.0f} | {r['compiler']} |")
  return "\n".join(lines)


def report(result: dict, config_path: str, extra: list, total_steps: int) -> str:
  out = [format_table(result, total_steps)]
  out.append(f"{result['tried']} candidates compiled or read from the cache, "
             f"{result['skipped']} meshes refused by a slice's layout"
             + (f"; the time budget ran out before {', '.join(result['left'])} (raise "
                "--search_budget_s; compiled plans are cached)" if result["left"] else "") + ".")
  if result["rows"]:
    best = result["rows"][0]
    out.append("Best: " + command(config_path, best["topology"], best["mesh"], best["remat"],
                                  best["micro_batches"], extra))
  else:
    out.append("Nothing fits: try a larger --max_chips, bfloat16 (--config.model.dtype), or a "
               "smaller batch.")
  return "\n".join(out)


def config_overrides(argv: list) -> list:
  """The --config.* flags given on the command line (kept in the printed command), less the
  ones the search sets itself."""
  own = ("--config.mesh.", "--config.model.remat_policy", "--config.grad_accum_steps")
  return [a for a in argv if a.startswith("--config.") and not a.startswith(own)]


def default_cache_dir() -> str:
  return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                      "igpt_jax", "plans")

