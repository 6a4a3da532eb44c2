"""What one device executes in a compiled (optimized, partitioned) XLA program, read from its HLO
text: matmul FLOPs, HBM traffic and the bytes each collective moves, with every loop counted as
many times as it runs.

XLA's own `cost_analysis()` counts a while loop's body once. The layers are a scan (one loop),
and the TPU compiler turns FSDP matmuls into loops over the weight shards ("windowed einsums":
collective matmuls), so its count fell to a fraction of the model's and did not grow with the
batch per device. Here each computation is weighted by how often it runs: a loop body by its trip
count (XLA's `known_trip_count`, else read from the loop: the condition compares a tuple element
with a constant, the body adds a constant to it, the loop's input sets its start).

- FLOPs: 2 x multiply-adds of every `dot` and `convolution` (padding excluded), inside fusions
  too. Elementwise work is left out (the model's count, flops.py, is matmuls only as well).
  Custom calls (Pallas kernels, cuDNN) are opaque: their FLOPs are added from the model.
- HBM bytes: operands plus results of every op outside fusions (a fusion reads its inputs and
  writes its outputs once), skipping views (bitcast, tuples) and, on TPU, arrays in on-chip
  memory spaces (a layout's `S(n)`, n > 0). An estimate of HBM traffic, like XLA's.
- Collectives: bytes each device sends, per the usual ring algorithms over a group of n:
  all-gather (n-1) x its shard, reduce-scatter and all-to-all (n-1)/n of the input, all-reduce
  2 (n-1)/n, collective-permute its operand. The groups (replica_groups, iota or explicit, and
  source_target_pairs) say which devices take part, so the caller can say which link each uses.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
                "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
                "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COLLECTIVES = {"all-gather": "all-gather", "all-gather-start": "all-gather",
                "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce",
                "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
                "collective-permute": "collective-permute",
                "collective-permute-start": "collective-permute"}
# Custom calls that are bookkeeping, not math (the rest are kernels: Pallas, cuDNN, ...).
NO_FLOP_CALLS = {"AllocateBuffer", "ConcatBitcast", "Sharding", "SPMDFullToShardShape",
                 "SPMDShardToFullShape", "MoveToHost", "MoveToDevice", "annotate_device_placement",
                 "xla_python_cpu_callback", "xla_ffi_python_cpu_callback"}
# Ops that move no HBM bytes of their own (views, control flow, bookkeeping).
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while",
               "call", "conditional", "after-all", "partition-id", "replica-id", "iota",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
               "async-update", "copy-done", "opt-barrier", "add-dependency", "domain"}


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str      # the result's type text: "bf16[8,1024]{1,0}" or a tuple "(f32[], ...)"
  opcode: str
  operands: list  # names
  attrs: str      # everything after the operand list
  root: bool = False


@dataclasses.dataclass
class Collective:
  kind: str           # all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute
  bytes_sent: float   # per device, per execution
  groups: list        # lists of partition ids that communicate (pairs for collective-permute)
  count: float        # executions per step (loop trip counts applied)


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  hbm_bytes: float = 0.0
  collectives: list = dataclasses.field(default_factory=list)
  loops: list = dataclasses.field(default_factory=list)  # (body, trips, how the count was found)
  custom_calls: dict = dataclasses.field(default_factory=dict)  # call target -> executions


def array_shapes(type_text: str) -> list:
  """[(dtype, dims, layout)] of every array in a type text (a tuple gives several)."""
  return [(m.group(1), [int(d) for d in m.group(2).split(",") if d], m.group(3) or "")
          for m in _ARRAY.finditer(type_text) if m.group(1) in _DTYPE_BYTES]


def nbytes(type_text: str, hbm_only: bool = False) -> float:
  total = 0.0
  for dtype, dims, layout in array_shapes(type_text):
    if hbm_only and re.search(r"S\(([1-9][0-9]*)\)", layout):
      continue
    total += _DTYPE_BYTES[dtype] * math.prod(dims)
  return total


def _split_top(text: str, sep: str = ",") -> list:
  out, depth, cur = [], 0, []
  for ch in text:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == sep and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(ch)
  if cur:
    out.append("".join(cur))
  return out


def _parse_instruction(line: str) -> Instruction | None:
  m = _INSTR.match(line)
  if not m:
    return None
  root, name, rest = bool(m.group(1)), m.group(2), m.group(3)
  # The result type runs up to the opcode: the first "word(" at depth 0.
  depth, i = 0, 0
  while i < len(rest):
    ch = rest[i]
    if ch in "([{":
      if ch == "(" and depth == 0 and i > 0 and (rest[i - 1].isalnum() or rest[i - 1] in "-_"):
        break
      depth += 1
    elif ch in ")]}":
      depth -= 1
    i += 1
  head = rest[:i]
  word = re.search(r"([\w\-]+)$", head)
  if not word:
    return None
  opcode = word.group(1)
  shape = head[:word.start()].strip()
  depth, j = 0, i
  while j < len(rest):
    if rest[j] in "([{":
      depth += 1
    elif rest[j] in ")]}":
      depth -= 1
      if depth == 0:
        break
    j += 1
  operand_text = rest[i + 1:j]
  if opcode == "constant":
    return Instruction(name, shape, opcode, [operand_text.strip()], rest[j + 1:], root)
  operands = []
  for o in _split_top(operand_text):
    found = re.findall(r"%([\w.\-]+)", o)
    if found:
      operands.append(found[-1])
    elif o.strip() and opcode != "constant":
      operands.append(o.strip().split()[-1])
  return Instruction(name, shape, opcode, operands, rest[j + 1:], root)


def parse(hlo_text: str) -> tuple[dict, str]:
  """{computation name: [Instruction]} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_HEADER.match(line)
      if m:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    ins = _parse_instruction(line)
    if ins is not None:
      comps[current].append(ins)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=(%?[\w.\-]+|\{{[^=]*?\}}(?=[,\s]|$))", attrs)
  return m.group(1).lstrip("%") if m else None


def called(ins: Instruction) -> list:
  """(computation, kind) pairs an instruction runs."""
  out = []
  for key, kind in (("calls", "call"), ("body", "body"), ("condition", "condition"),
                    ("to_apply", "apply")):
    for m in re.finditer(rf"\b{key}=%?([\w.\-]+)", ins.attrs):
      out.append((m.group(1), kind))
  m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if m:
    out += [(b.strip().lstrip("%"), "call") for b in m.group(1).split(",") if b.strip()]
  for key in ("true_computation", "false_computation"):
    c = _attr(ins.attrs, key)
    if c:
      out.append((c, "call"))
  return out


def _const_value(ins: Instruction | None) -> int | None:
  if ins is None or ins.opcode != "constant":
    return None
  m = re.fullmatch(r"-?\d+", ins.operands[0] if ins.operands else "")
  return int(m.group(0)) if m else None


def _through_converts(table: dict, name: str) -> Instruction | None:
  ins = table.get(name)
  while ins is not None and ins.opcode in ("convert", "copy", "bitcast") and ins.operands:
    ins = table.get(ins.operands[0])
  return ins


def trip_count(while_ins: Instruction, comps: dict, parent: list) -> tuple[int, str]:
  """(trips, how found) of a while loop; (1, "unknown") where it cannot be read."""
  m = re.search(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)', while_ins.attrs)
  if m:
    return int(m.group(1)), "known_trip_count"
  cond, body = _attr(while_ins.attrs, "condition"), _attr(while_ins.attrs, "body")
  if cond not in comps or body not in comps:
    return 1, "unknown"
  ctable = {i.name: i for i in comps[cond]}
  root = next((i for i in comps[cond] if i.root), None)
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return 1, "unknown"
  direction = (re.search(r"direction=(\w+)", root.attrs) or [None, ""])[1]
  a, b = (_through_converts(ctable, o) for o in root.operands)
  if _const_value(a) is not None and b is not None:  # N > i is i < N
    a, b = b, a
    direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
  limit = _const_value(b)
  if a is None or a.opcode != "get-tuple-element" or limit is None or direction not in (
      "LT", "LE", "NE"):
    return 1, "unknown"
  index = int(re.search(r"index=(\d+)", a.attrs).group(1))
  btable = {i.name: i for i in comps[body]}
  broot = next((i for i in comps[body] if i.root), None)
  if broot is None or broot.opcode != "tuple" or index >= len(broot.operands):
    return 1, "unknown"
  step_ins = _through_converts(btable, broot.operands[index])
  if step_ins is None or step_ins.opcode != "add":
    return 1, "unknown"
  step = next((v for v in (_const_value(_through_converts(btable, o))
                           for o in step_ins.operands) if v is not None), None)
  if not step or step <= 0:
    return 1, "unknown"
  # The start: the loop's input tuple's element, where it is a constant (else 0).
  ptable = {i.name: i for i in parent}
  start, how = 0, "condition, start assumed 0"
  init = ptable.get(while_ins.operands[0]) if while_ins.operands else None
  if init is not None and init.opcode == "tuple" and index < len(init.operands):
    v = _const_value(_through_converts(ptable, init.operands[index]))
    if v is not None:
      start, how = v, "condition"
  end = limit + (1 if direction == "LE" else 0)
  return max(0, -(-(end - start) // step)), how


def _iota_groups(text: str) -> list:
  """`[G,n]<=[d0,d1,...]T(p...)`: XLA's iota replica-group list."""
  m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
  shape = [int(x) for x in m.group(1).split(",")]
  dims = [int(x) for x in m.group(2).split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  if m.group(3):
    ids = ids.transpose([int(x) for x in m.group(3).split(",")])
  return ids.reshape(shape[0], -1).tolist() if len(shape) > 1 else [ids.reshape(-1).tolist()]


def _mesh_groups(attrs: str) -> list | None:
  """`replica_groups=mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}`: the devices laid out
  on a named mesh; a group is the devices that differ only along the listed axes."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?"
                r"\s*\{([^}]*)\}", attrs)
  if not m:
    return None
  axes = [(a, int(n)) for a, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
  sizes = [n for _, n in axes]
  if m.group(2):
    ids = np.array(_iota_groups(f"[{math.prod(sizes)}]<={m.group(2).strip()}")[0])
  else:
    ids = np.arange(math.prod(sizes))
  ids = ids.reshape(sizes)
  grouped = [k for k, (a, _) in enumerate(axes) if f"'{a}'" in m.group(3)]
  others = [k for k in range(len(axes)) if k not in grouped]
  ids = ids.transpose(others + grouped).reshape(-1, math.prod(sizes[k] for k in grouped))
  return ids.tolist()


def replica_groups(attrs: str, num_partitions: int) -> list:
  groups = _mesh_groups(attrs)
  if groups is not None:
    return groups
  m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
  if m:
    return _iota_groups(m.group(1))
  m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
  if m and m.group(1).strip():
    return [[int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
  return [list(range(num_partitions))]  # empty: everyone


def _conv_flops(ins: Instruction, table: dict) -> float:
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not labels or len(ins.operands) < 2:
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  lhs, rhs = (table.get(o) for o in ins.operands[:2])
  out = array_shapes(ins.shape)
  if lhs is None or rhs is None or not out:
    return 0.0
  lhs_dims, rhs_dims, out_dims = (array_shapes(lhs.shape)[0][1], array_shapes(rhs.shape)[0][1],
                                  out[0][1])
  macs = out_dims[out_l.index("b")] * out_dims[out_l.index("f")] * rhs_dims[rhs_l.index("i")]
  spatial = sorted(c for c in lhs_l if c.isdigit())
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  wtext = window.group(1) if window else ""

  def field(key, default):
    m = re.search(rf"\b{key}=([\dx_\-]+)", wtext)
    if not m:
      return [default] * len(spatial)
    return [tuple(int(v) for v in p.split("_")) if "_" in p else int(p)
            for p in m.group(1).split("x")]

  stride, pad = field("stride", 1), field("pad", (0, 0))
  lhs_dil, rhs_dil = field("lhs_dilate", 1), field("rhs_dilate", 1)
  for k, d in enumerate(spatial):
    n_in, size = lhs_dims[lhs_l.index(d)], rhs_dims[rhs_l.index(d)]
    n_out = out_dims[out_l.index(d)]
    o = np.arange(n_out)[:, None] * stride[k]
    w = np.arange(size)[None, :] * rhs_dil[k]
    pos = o + w - pad[k][0]
    valid = (pos >= 0) & (pos <= (n_in - 1) * lhs_dil[k]) & (pos % lhs_dil[k] == 0)
    macs *= int(valid.sum())
  return 2.0 * macs


def _dot_flops(ins: Instruction, table: dict) -> float:
  lhs = table.get(ins.operands[0]) if ins.operands else None
  out = array_shapes(ins.shape)
  if lhs is None or not out:
    return 0.0
  dims = array_shapes(lhs.shape)[0][1]
  m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
  contracted = math.prod(dims[int(c)] for c in m.group(1).split(",") if c) if m else 1
  return 2.0 * math.prod(out[0][1]) * contracted


def analyze(hlo_text: str, num_partitions: int) -> Cost:
  """The per-device cost of one execution of the compiled module `hlo_text`."""
  comps, entry = parse(hlo_text)
  cost = Cost()
  weight: dict = {}
  fused: set = set()
  order = [(entry, 1.0, False)]
  # Walk the call graph, multiplying each computation's weight by its callers'.
  while order:
    name, w, in_fusion = order.pop()
    if name not in comps:
      continue
    weight[name] = weight.get(name, 0.0) + w
    if in_fusion:
      fused.add(name)
    for ins in comps[name]:
      trips = 1
      if ins.opcode == "while":
        trips, how = trip_count(ins, comps, comps[name])
        cost.loops.append((_attr(ins.attrs, "body"), trips, how))
      for callee, kind in called(ins):
        if kind == "apply":
          continue  # scalar reducers of reduce/scatter/sort: elementwise work
        factor = trips + 1 if kind == "condition" else trips if kind == "body" else 1
        order.append((callee, w * factor, in_fusion or ins.opcode == "fusion"))

  for name, w in weight.items():
    table = {i.name: i for i in comps[name]}
    for ins in comps[name]:
      op = ins.opcode
      if op == "dot":
        cost.flops += w * _dot_flops(ins, table)
      elif op == "convolution":
        cost.flops += w * _conv_flops(ins, table)
      if name in fused:
        continue
      if op == "custom-call":
        m = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
        target = m.group(1) if m else "?"
        cost.custom_calls[target] = cost.custom_calls.get(target, 0.0) + w
      if op in _COLLECTIVES:
        kind = _COLLECTIVES[op]
        operand_bytes = sum(nbytes(table[o].shape) for o in ins.operands if o in table)
        if kind == "collective-permute":
          pairs = [[int(a), int(b)] for a, b in re.findall(
              r"\{(\d+),(\d+)\}", (re.search(r"source_target_pairs=\{(.*?)\}\}", ins.attrs)
                                   or [None, ""])[1] + "}")]
          moving = [p for p in pairs if p[0] != p[1]]
          sent = operand_bytes if moving else 0.0
          cost.collectives.append(Collective(kind, sent, moving, w))
          continue
        groups = replica_groups(ins.attrs, num_partitions)
        n = max(len(g) for g in groups)
        if kind == "all-gather":
          sent = operand_bytes * (n - 1)
        elif kind == "all-reduce":
          sent = 2 * operand_bytes * (n - 1) / n
        else:  # reduce-scatter, all-to-all
          sent = operand_bytes * (n - 1) / n
        cost.collectives.append(Collective(kind, sent, groups, w))
      if op in _NO_TRAFFIC or op.endswith("-done"):
        continue
      cost.hbm_bytes += w * _traffic(ins, table, comps)
  return cost


_SLICES = ("slice", "dynamic-slice", "gather")


def _traffic(ins: Instruction, table: dict, comps: dict) -> float:
  """HBM bytes an op outside fusions reads and writes. Slices read only what they take, and an
  in-place update (dynamic-update-slice, also as a fusion's root) writes only the update: a
  scan reads and writes one layer's slice of its stacked arrays per iteration, not the stack."""
  def size(name):
    return nbytes(table[name].shape, hbm_only=True) if name in table else 0.0

  op = ins.opcode
  if op in _SLICES:
    return 2 * nbytes(ins.shape, hbm_only=True)
  if op == "slice-start":  # ((operand), slice, context): the slice comes from HBM
    parts = _split_top(ins.shape.strip()[1:-1])
    return nbytes(parts[1]) if len(parts) > 1 else 0.0
  if op == "dynamic-update-slice":
    return 2 * size(ins.operands[1]) if len(ins.operands) > 1 else 0.0
  if op != "fusion" or _attr(ins.attrs, "calls") not in comps:
    return nbytes(ins.shape, hbm_only=True) + sum(size(o) for o in ins.operands)
  body = comps[_attr(ins.attrs, "calls")]
  ftable = {i.name: i for i in body}
  params = {int(re.search(r"^\s*(\d+)", i.operands[0]).group(1)): i
            for i in body if i.opcode == "parameter" and i.operands}
  users: dict = {}
  for i in body:
    for k, o in enumerate(i.operands):
      users.setdefault(o, []).append((i, k))
  total = 0.0
  for k, operand in enumerate(ins.operands):
    p = params.get(k)
    uses = users.get(p.name, []) if p is not None else []
    if uses and all(u.opcode in _SLICES and pos == 0 for u, pos in uses):
      total += sum(nbytes(u.shape, hbm_only=True) for u, _ in uses)
    elif uses and all(u.opcode == "dynamic-update-slice" and pos == 0 for u, pos in uses):
      continue  # updated in place: only the update is written, counted with the output
    else:
      total += size(operand)
  root = next((i for i in body if i.root), None)
  outputs = ([ftable.get(o) for o in root.operands] if root is not None and root.opcode == "tuple"
             else [root])
  for out in outputs:
    if out is not None and out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
      total += nbytes(ftable[out.operands[1]].shape) if out.operands[1] in ftable else 0.0
    elif out is not None:
      total += nbytes(out.shape, hbm_only=True)
  return total
