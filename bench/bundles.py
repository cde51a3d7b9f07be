"""Parser of the TPU compiler's `*-final_bundles.txt` schedule dumps (no jax needed).

`LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR` makes libtpu write, per Pallas kernel
and per XLA fusion, the final VLIW bundle schedule. One bundle issues in one
cycle, so the static cycle count of a kernel is

  straight-line bundles + sum over loops of (loop body bundles x trip count)
  - bundles of predicated regions on the iterations that branch over them.

DMA waits and pipeline stalls are not in the static schedule: the count is a
lower bound on time. Format checked against libtpu 0.0.42.1 (jax 0.10.2).

Format, as seen:
  `  0xb LB: > { op ;; op ;; ... } /* Start region 232 :: End region 7 */`
  address (decimal `0`, then hex), an optional tag (LB: loop body start, PF:
  predicated-region fallthrough, ...), `>` per loop nesting level, the bundle.
  The grid loop runs from the `LB:` bundle to its backward `sbr.rel` (plus the
  branch delay slots); its trip count is the constant in the compare marked
  `/* loop exit test */`. A `pl.when` region is a forward conditional
  `sbr.rel (%p) target = $regionN` over the region to the bundle where region
  N starts.

Kernels the compiler found identical are dumped once: the top-level program
(`TLP`) calls each HLO op with an `inlined_call /* %name = ... */` bundle, and
`*-TLP-00-deduplication-map.txt` lists, per dumped kernel (`key:`), the ops
that share its code (`equivalent_hlos`). `program_calls` turns the two into
the number of times each dumped kernel runs.
"""
from __future__ import annotations

import dataclasses
import re

# Bundles issued after a branch before it takes effect (seen on v4, v5e, v5p
# and v6e with libtpu 0.0.42.1: the loop's back-branch is followed by four
# bundles that still belong to the loop body).
BRANCH_DELAY_SLOTS = 4

_BUNDLE_START_RE = re.compile(r"^\s*(?:0x[0-9a-fA-F]+|\d+)\s+(?:[A-Z]{2})?:\s*>*\s*\{")
_BUNDLE_RE = re.compile(
    r"^\s*(0x[0-9a-fA-F]+|\d+)\s+(?:([A-Z]{2}))?:\s*(>*)\s*\{(.*)\}(.*)$", re.DOTALL)
_BRANCH_RE = re.compile(r"sbr\.rel\s*(\(([^)]*)\))?\s*target\s*=\s*\$region(\d+)")
_REGION_START_RE = re.compile(r"Start(?:/End empty)? region (\d+)")
_EXIT_TEST_RE = re.compile(
    r"scmp\.(\w+)\.s32\.totalorder\s+%\w+,\s*(-?\d+)\s*/\*\s*loop exit test")
_FILE_RE = re.compile(r"^(\d+)-(.*)-(\d+)-final_bundles\.txt$")
_CORE_ID_RE = re.compile(r"%(\w+)\s*=\s*sld\s*\[smem:\[#\w+\]\]\s*/\*\s*core id\s*\*/")
_NONZERO_RE = re.compile(r"%(\w+)\s*=\s*scmp\.ne\.s32\.totalorder\s+%(\w+),\s*0\b")


_CALL_RE = re.compile(r"inlined_call\b[^/{}]*/\*\s*(?:%([\w.\-]+)\s*=|(<[\w\-]+>))")


class ScheduleFormatError(ValueError):
  """The dump is not in the format this parser was checked against."""


@dataclasses.dataclass(frozen=True)
class Span:
  """A forward conditional branch: when taken, `skipped` bundles do not issue."""
  branch: int      # address of the sbr.rel bundle
  target: int      # address of the first bundle of the target region
  predicate: str

  @property
  def skipped(self) -> int:
    return max(0, self.target - (self.branch + 1 + BRANCH_DELAY_SLOTS))

  def contains(self, other: "Span") -> bool:
    return self.branch < other.branch and other.target <= self.target


@dataclasses.dataclass(frozen=True)
class Loop:
  start: int       # LB bundle
  end: int         # last bundle of the body (back-branch + delay slots)
  trips: int
  spans: tuple[Span, ...]  # forward conditional branches inside the body

  @property
  def body(self) -> int:
    return self.end - self.start + 1

  def guard(self) -> Span | None:
    """The largest span: the pipeline's guard around the kernel body."""
    return max(self.spans, key=lambda s: s.skipped, default=None)

  def when_regions(self) -> list[Span]:
    """Spans directly inside the guard: the kernel's `pl.when` regions."""
    g = self.guard()
    if g is None:
      return []
    inner = [s for s in self.spans if g.contains(s)]
    return [s for s in inner if not any(o.contains(s) for o in inner if o is not s)]


@dataclasses.dataclass(frozen=True)
class Schedule:
  name: str
  bundles: int
  loops: tuple[Loop, ...]

  @property
  def straight_line(self) -> int:
    return self.bundles - sum(l.body for l in self.loops)

  def static_cycles(self) -> int:
    """All bundles of every loop iteration issue (no region skipped)."""
    return self.straight_line + sum(l.body * l.trips for l in self.loops)

  def to_json(self) -> dict:
    return {
        "name": self.name, "bundles": self.bundles,
        "loops": [{"start": l.start, "end": l.end, "trips": l.trips,
                   "spans": [[s.branch, s.target, s.predicate] for s in l.spans]}
                  for l in self.loops]}

  @classmethod
  def from_json(cls, d: dict) -> "Schedule":
    return cls(d["name"], d["bundles"], tuple(
        Loop(l["start"], l["end"], l["trips"], tuple(Span(*s) for s in l["spans"]))
        for l in d["loops"]))


def kernel_name(filename: str) -> str | None:
  """`<id>-<name>-<pass>-final_bundles.txt` -> name; None for other files."""
  m = _FILE_RE.match(filename.rsplit("/", 1)[-1])
  return m.group(2) if m else None


def _bundles(text: str, name: str) -> list[tuple[int, str, int, str, str]]:
  """[(address, tag, loop depth, body, comment)] of a dump, one per bundle."""
  # A bundle may span lines (DMA descriptors in comments): join until the next.
  chunks: list[str] = []
  for line in text.splitlines():
    if _BUNDLE_START_RE.match(line):
      chunks.append(line)
    elif chunks and not line.startswith("= control target"):
      chunks[-1] += "\n" + line
  bundles = []  # (addr, tag, depth, body, comment)
  for chunk in chunks:
    m = _BUNDLE_RE.match(chunk)
    if not m:
      raise ScheduleFormatError(f"{name}: unrecognised bundle {chunk[:80]!r}")
    else:
      addr = int(m.group(1), 0)
      bundles.append((addr, m.group(2) or "", len(m.group(3)), m.group(4), m.group(5)))
  if not bundles:
    raise ScheduleFormatError(f"{name}: no bundle lines recognised")
  addrs = [b[0] for b in bundles]
  if addrs != list(range(len(addrs))):
    raise ScheduleFormatError(f"{name}: bundle addresses are not 0, 1, 2, ...")
  return bundles


def parse(text: str, name: str = "") -> Schedule:
  """Parses one `*-final_bundles.txt`; raises ScheduleFormatError if unrecognised."""
  bundles = _bundles(text, name)
  region_start: dict[int, int] = {}
  for addr, _, _, _, comment in bundles:
    for r in _REGION_START_RE.findall(comment):
      region_start.setdefault(int(r), addr)

  # "core id != 0" predicates: a kernel that runs on TensorCore 0 alone (splash
  # attention's backward on v5p) sends core 1 from its first bundles to the
  # exit bundle, a region the dump never starts. Counted as core 0 runs it.
  core_ids = {m.group(1) for _, _, _, body, _ in bundles for m in _CORE_ID_RE.finditer(body)}
  off_core0 = {m.group(1) for _, _, _, body, _ in bundles for m in _NONZERO_RE.finditer(body)
               if m.group(2) in core_ids}
  exit_addr = bundles[-1][0] if "exit bundle" in bundles[-1][4] else None
  branches = []  # (addr, predicate or None, target addr)
  for addr, _, _, body, _ in bundles:
    for m in _BRANCH_RE.finditer(body):
      region = int(m.group(3))
      if region in region_start:
        branches.append((addr, m.group(2), region_start[region]))
      elif exit_addr is not None and (m.group(2) or "").lstrip("%") in off_core0:
        branches.append((addr, m.group(2), exit_addr))
      else:
        raise ScheduleFormatError(f"{name}: branch at {addr:#x} to unknown region {region}")

  loops = []
  for addr, tag, depth, body, _ in bundles:
    if tag != "LB":
      continue
    if depth != 1:
      raise ScheduleFormatError(f"{name}: nested loop at {addr:#x} (depth {depth})")
    backs = [b for b in branches if b[2] == addr and b[0] > addr]
    if len(backs) != 1:
      raise ScheduleFormatError(f"{name}: loop at {addr:#x} has {len(backs)} back-branches")
    back = backs[0][0]
    tests = [(a, _EXIT_TEST_RE.search(bd)) for a, _, _, bd, _ in bundles[addr:back + 1]
             if "loop exit test" in bd]
    if len(tests) != 1 or tests[0][1] is None:
      raise ScheduleFormatError(f"{name}: loop at {addr:#x}: no constant loop exit test")
    cmp, bound = tests[0][1].group(1), int(tests[0][1].group(2))
    if cmp not in ("ge", "eq"):
      raise ScheduleFormatError(f"{name}: loop exit test scmp.{cmp} not recognised")
    spans = tuple(Span(a, t, p) for a, p, t in branches
                  if addr <= a <= back and t > a and p is not None)
    if any(p is None and addr <= a <= back and t > a for a, p, t in branches):
      raise ScheduleFormatError(f"{name}: unconditional forward branch in loop at {addr:#x}")
    loops.append(Loop(addr, back + BRANCH_DELAY_SLOTS, bound, spans))
  for l1, l2 in zip(loops, loops[1:]):
    if l2.start <= l1.end:
      raise ScheduleFormatError(f"{name}: overlapping loops")
  return Schedule(name, len(bundles), tuple(loops))


# Issue-slot classes of vector ops (mnemonics as in libtpu 0.0.42.1's dumps).
_SLOT_CLASSES = (
    ("mxu", re.compile(r"vmat(?:mul|prep|push\d?)\b")),
    ("mxu_result", re.compile(r"vpop\.f32\b|vmatres\b")),
    ("eup", re.compile(r"v(?:tanh|exp|rcp|rsqrt|log|pow2|sqrt|sin|cos)\b")),
    ("eup_result", re.compile(r"vpop\.eup\b")),
    ("xlu", re.compile(r"v(?:xpose|rot|perm|bcast)\b|vpop\.(?:trf|permute)\b")),
    ("load", re.compile(r"vld\b")),
    ("store", re.compile(r"vst\w*\b")),
    ("valu", re.compile(r"v(?:add|sub|mul|max|min|sel|cmp|pack|unpack|and|or|xor|not|cvt|mov|"
                        r"clamp|shl|shr|shra|abs|neg)\b")),
)
_OP_RE = re.compile(r"(?:^|;;|=)\s*(v[a-z][\w.]*)")


def _slot_class(op: str) -> str:
  """The issue-slot class of a vector op's mnemonic (`_SLOT_CLASSES`)."""
  return next((c for c, rx in _SLOT_CLASSES if rx.match(op)), "vector_other")


def slot_counts(text: str, sched: Schedule) -> dict[str, int]:
  """Vector ops of each issue-slot class (`_SLOT_CLASSES`; "vector_other"
  for the rest) over every bundle the static count issues: straight-line
  bundles once, a loop body's `trips` times (no region skipped, as
  `Schedule.static_cycles`). With the cycles, ops per cycle show which unit
  bounds a kernel (a bundle has 4 VALU slots on v5e and v6e)."""
  counts: dict[str, int] = {}
  weight = [1] * sched.bundles
  for loop in sched.loops:
    # A back-branch among the last bundles puts `end` (its delay slots) past the dump.
    for a in range(loop.start, min(loop.end, sched.bundles - 1) + 1):
      weight[a] = loop.trips
  for addr, _, _, body, _ in _bundles(text, sched.name):
    for op in _OP_RE.findall(body):
      cls = _slot_class(op)
      counts[cls] = counts.get(cls, 0) + weight[addr]
  return counts


def slots_per_bundle(text: str, sched: Schedule) -> dict[str, dict[int, int]]:
  """For each issue-slot class (`_SLOT_CLASSES`, "vector_other" for the
  rest), how many bundles of the first loop's body (a Pallas kernel's grid
  step) issue 0, 1, 2, ... of its ops: the largest count a class reaches is
  its slots per bundle (v4 one `vld` and one `vst`, v5e three `vld`), and a
  class issuing in nearly every bundle at that count bounds the step."""
  if not sched.loops:
    raise ValueError(f"{sched.name}: no loop")
  loop = sched.loops[0]
  hist: dict[str, dict[int, int]] = {c: {} for c, _ in _SLOT_CLASSES}
  hist["vector_other"] = {}
  for addr, _, _, body, _ in _bundles(text, sched.name):
    if not loop.start <= addr <= min(loop.end, sched.bundles - 1):
      continue
    counts = dict.fromkeys(hist, 0)
    for op in _OP_RE.findall(body):
      counts[_slot_class(op)] += 1
    for cls, n in counts.items():
      hist[cls][n] = hist[cls].get(n, 0) + 1
  return hist


def grid_kernel_cycles(sched: Schedule, *, steps: int, when_fractions,
                       stages: int | None = None) -> dict:
  """Static cycles of a Pallas grid kernel run for `steps` grid steps (one core).

  The kernel has one loop, the grid loop, whose trip count in the dump is its
  compiled steps plus pipeline stages; `steps` may differ from the compiled
  count (the body does not depend on the grid size), which is how one compile
  gives the count at any sequence length.

  The guard (largest span) is skipped on the `stages` pipeline-only trips. The
  regions directly inside it are the kernel's `pl.when`s; `when_fractions(spans)`
  returns, per region, the fraction of grid steps on which it runs.
  """
  if len(sched.loops) != 1:
    raise ScheduleFormatError(f"{sched.name}: {len(sched.loops)} loops, expected 1")
  loop = sched.loops[0]
  guard = loop.guard()
  if guard is None:
    raise ScheduleFormatError(f"{sched.name}: no guard region in the grid loop")
  if stages is None:
    raise ValueError("stages is required")
  whens = loop.when_regions()
  fractions = when_fractions(whens)
  trips = steps + stages
  cycles = sched.straight_line + loop.body * trips
  cycles -= guard.skipped * stages
  skipped = 0.0
  for span, frac in zip(whens, fractions):
    skipped += span.skipped * (1.0 - frac) * steps
  cycles -= skipped
  return {"cycles": cycles, "body": loop.body, "trips": trips,
          "guard_skipped": guard.skipped,
          "when_regions": [[s.skipped, f] for s, f in zip(whens, fractions)]}


def program_calls(tlp_text: str, dedup_map_text: str | None = None) -> dict[str, int]:
  """How many times the top-level program runs each dumped kernel.

  tlp_text: the `TLP` `*-final_bundles.txt`; dedup_map_text: the
  `*-TLP-00-deduplication-map.txt` of the same compile (None: no dedup).
  Returns {dumped kernel name: calls}; a name absent was never called from
  the TLP. Raises ScheduleFormatError if the TLP calls nothing.
  """
  key_of = {}
  key = None
  for line in (dedup_map_text or "").splitlines():
    line = line.strip()
    if line.startswith("key:"):
      key = line[4:]
      key_of[key] = key
    elif key and line and not line.startswith(("ordinal:", "equivalent_hlos")):
      key_of[line] = key
  calls: dict[str, int] = {}
  for m in _CALL_RE.finditer(tlp_text):
    name = m.group(1) or m.group(2)
    k = key_of.get(name, name)
    calls[k] = calls.get(k, 0) + 1
  if not calls:
    raise ScheduleFormatError("TLP: no inlined_call bundle recognised")
  return calls


# --- layout copies in the compiled program --------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*)$")


def _array_bytes(dtype: str, dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n * _DTYPE_BYTES.get(dtype, 4)


def _plain_layout(layout: str | None) -> str:
  """The layout without its memory space (`S(1)`: the same bytes moved to VMEM)."""
  return re.sub(r"S\(\d+\)", "", layout or "")


_MOVE_OPS = {"parameter", "bitcast", "copy", "transpose", "tuple", "get-tuple-element"}


def layout_copies(hlo_text: str) -> list[dict]:
  """Copies in a compiled HLO module (`compiled.as_text()`) that change an array's layout.

  A `copy` or `copy-start` whose result layout (tiling included) differs from
  its operand's, ignoring the memory space (`S(1)`: the same bytes moved to
  VMEM), and a fusion that only moves data (its fused computation holds
  nothing but bitcasts, copies and transposes): the transposes XLA inserts
  around a custom call whose operand layout is not the producer's.
  Instructions inside fused computations belong to their fusion.
  Returns [{"name", "op", "bytes"}], bytes = the result's size (one way).
  """
  layouts, found, fused_ops = {}, [], {}
  computation = None
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and ("{" in line and "(" in line):
      header = line.split("(")[0].split()
      computation = header[-1].lstrip("%") if header and not line.startswith("HloModule") else None
      is_fused = computation is not None and not line.startswith("ENTRY") and (
          "fused" in computation or "wrapped" in computation)
      if is_fused:
        fused_ops[computation] = set()
      continue
    m = _INSTR.match(line)
    if m is None:
      continue
    name, shape, op, rest = m.groups()
    if computation in fused_ops:
      fused_ops[computation].add(op)
      continue
    arrays = _ARRAY.findall(shape)
    if arrays:
      layouts[name] = arrays[0]
    if op == "fusion":
      calls = re.search(r"calls=%([\w.-]+)", rest)
      if calls:
        found.append((name, op, calls.group(1), arrays))
    elif op in ("copy", "copy-start") and arrays:
      operand = re.match(r"\s*%([^,)\s]+)", rest)
      src = layouts.get(operand.group(1)) if operand else None
      if src is not None and _plain_layout(arrays[0][2]) != _plain_layout(src[2]):
        found.append((name, op, None, arrays[:1]))
  copies = []
  for name, op, calls, arrays in found:
    if calls is not None:
      ops = fused_ops.get(calls, {"unknown"})
      if not (ops <= _MOVE_OPS and ops & {"copy", "transpose"}):
        continue
    copies.append(dict(name=name, op=op, bytes=sum(_array_bytes(d, n) for d, n, _ in arrays)))
  return copies
