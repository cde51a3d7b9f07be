"""The TPU schedule parser (bench/bundles.py) on a saved real dump, without libtpu.

tests/data/tiny_accumulate_v5e_final_bundles.txt was written by
`python bench/tpu_schedule.py --write-test-data PATH` (jax 0.10.2, libtpu
0.0.42.1, v5e): a grid (2, 4) kernel, blocks (128, 128), with one
`pl.when(program_id(1) == 0)` region.
"""
import importlib.util
import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
import bundles  # noqa: E402

DATA = os.path.join(HERE, "data", "tiny_accumulate_v5e_final_bundles.txt")


@pytest.fixture(scope="module")
def sched():
  return bundles.parse(open(DATA).read(), "tiny_accumulate.1")


def test_bundles_and_loop(sched):
  assert sched.bundles == 113           # addresses 0 .. 0x70
  (loop,) = sched.loops
  assert loop.start == 0x7              # the `LB:` bundle
  assert loop.end == 0x68 + bundles.BRANCH_DELAY_SLOTS   # back-branch + delay slots
  assert loop.trips == 10               # `scmp.ge ... 10 /* loop exit test */`: 2 x 4 steps + 2 stages
  assert sched.straight_line == 113 - loop.body


def test_guard_and_when_region(sched):
  (loop,) = sched.loops
  guard = loop.guard()
  assert (guard.branch, guard.target) == (0x20, 0x5f)   # pipeline guard -> $region24
  (when,) = loop.when_regions()
  assert (when.branch, when.target) == (0x27, 0x3d)     # pl.when -> $region32
  assert when.predicate == "%p440_p3"
  assert when.skipped == 0x3d - (0x27 + 1 + bundles.BRANCH_DELAY_SLOTS)


def test_grid_cycles(sched):
  (loop,) = sched.loops
  g, w = loop.guard(), loop.when_regions()[0]
  got = bundles.grid_kernel_cycles(sched, steps=8, when_fractions=lambda s: [0.25],
                                   stages=2)
  want = sched.straight_line + loop.body * 10 - 2 * g.skipped - 8 * 0.75 * w.skipped
  assert got["cycles"] == want
  # The body does not depend on the grid: 10x the steps is 10x the loop work.
  big = bundles.grid_kernel_cycles(sched, steps=80, when_fractions=lambda s: [0.25],
                                   stages=2)["cycles"]
  assert big - got["cycles"] == pytest.approx(72 * (loop.body - 0.75 * w.skipped))


def test_static_cycles_upper_bound(sched):
  got = bundles.grid_kernel_cycles(sched, steps=8, when_fractions=lambda s: [0.25],
                                   stages=2)["cycles"]
  assert got < sched.static_cycles() == sched.straight_line + sched.loops[0].body * 10


def test_json_round_trip(sched):
  assert bundles.Schedule.from_json(sched.to_json()) == sched


def test_kernel_name():
  assert bundles.kernel_name("1795-polysketch_causal_forward.1-72-final_bundles.txt") == \
      "polysketch_causal_forward.1"
  assert bundles.kernel_name("17-<late-finalization>-68-final_bundles.txt") == "<late-finalization>"
  assert bundles.kernel_name("17-copy.1-65-schedule-analysis_final_bundles.txt") is None


def test_unrecognised_format_raises():
  with pytest.raises(bundles.ScheduleFormatError):
    bundles.parse("nothing like a schedule\n", "x")
  text = open(DATA).read().replace("/* loop exit test */", "")
  with pytest.raises(bundles.ScheduleFormatError, match="loop exit test"):
    bundles.parse(text, "x")
  # A gap in the addresses (a truncated dump) is refused, not counted.
  lines = [l for l in open(DATA).read().splitlines() if not l.lstrip().startswith("0x30 ")]
  with pytest.raises(bundles.ScheduleFormatError, match="addresses"):
    bundles.parse("\n".join(lines), "x")


def test_multiline_bundle():
  text = ("   0   :  { %1 = vsyncpa [#allocation1], 0 }\n"
          "   0x1   :  { %2 = dma.hbm_to_vmem /* descriptor\n"
          "base_bounds: (1, 2)\n"
          "*/ }\n"
          "   0x2   :  { %3 = vsyncpa [#allocation1], 1 }\n")
  s = bundles.parse(text, "m")
  assert s.bundles == 3 and s.static_cycles() == 3


def test_slot_counts_classify_ops_and_weight_loop_bodies(sched):
  text = ("   0   :  { %1 = vadd.f32 %v1, %v2  ;;  %2 = vmul.f32 %v3, %v4  ;;  %v5 = vld [vmem:[#a]] }\n"
          "   0x1   :  { %3 = vmatmul.mubr.bf16.mxu0 %v5  ;;  %v6 = vpop.f32.mrb[0].mxu0  ;;  "
          "%7 = vtanh.f32 %v6  ;;  vst [vmem:[#b] sm:$0xff] /*vst_source=*/%v6 }\n"
          "   0x2   :  { %v8 = vpop.eup %7  ;;  %9 = vxpose.xlu0 %v8  ;;  %10 = vsyncpa [#allocation1], 1 }\n")
  s = bundles.parse(text, "straight")
  assert bundles.slot_counts(text, s) == dict(valu=2, load=1, mxu=1, mxu_result=1, eup=1,
                                              store=1, eup_result=1, xlu=1, vector_other=1)
  # the real kernel (VALU ops only): an op in the grid loop's body counts once per trip
  real = open(DATA).read()
  counts = bundles.slot_counts(real, sched)
  (loop,) = sched.loops
  body = outside = 0
  for line in real.splitlines():
    head = line.split(":", 1)[0].split()
    if head and head[0].startswith(("0x", "0")) and head[0].replace("x", "").isalnum():
      n = len(re.findall(r"= (?:vadd|vmul|vpack|vunpack|vmov)\b", line))
      addr = int(head[0], 0)
      if loop.start <= addr <= loop.end:
        body += n
      else:
        outside += n
  assert body > 0
  assert counts["valu"] == body * loop.trips + outside


def test_slots_per_bundle_counts_the_grid_loop_body_only():
  text = ("   0   :  { %1 = vld [vmem:[#a]]  ;;  %2 = vld [vmem:[#a]] }\n"
          "   0x1   :  { %3 = vld [vmem:[#a]]  ;;  %4 = vadd.f32 %v1, %v2 }\n"
          "   0x2   :  { %5 = vadd.f32 %v3, %v4  ;;  %6 = vadd.f32 %v3, %v4  ;;  "
          "vst [vmem:[#b] sm:$0xff] /*vst_source=*/%v6 }\n"
          "   0x3   :  { %7 = vmul.f32 %v3, %v4 }\n")
  s = bundles.Schedule("body", 4, (bundles.Loop(1, 2, 7, ()),))
  hist = bundles.slots_per_bundle(text, s)
  # bundles 1 and 2 only, each once (not `trips` times)
  assert hist["load"] == {1: 1, 0: 1}
  assert hist["valu"] == {1: 1, 2: 1}
  assert hist["store"] == {0: 1, 1: 1}
  assert hist["mxu"] == {0: 2}
  with pytest.raises(ValueError, match="no loop"):
    bundles.slots_per_bundle(text, bundles.Schedule("flat", 4, ()))


def _core0_only_kernel(predicate_source):
  return ("     0   :  { %s1_s2 = sld [smem:[#allocation0]] /* core id */ }\n"
          f"   0x1   :  {{ %p3_p0 = scmp.ne.s32.totalorder %{predicate_source}, 0 }}\n"
          "   0x2   :  { %4 = sbr.rel (%p3_p0) target = $region4 }\n"
          + "".join(f"   {a:#x}   :  {{ %{a}0 = vadd.f32 %v1, %v2 }}\n" for a in range(3, 8))
          + "   0x8 PF:  {} /* exit bundle: %k = custom-call(%a) */\n")


def test_a_kernel_for_core_0_alone_parses():
  # splash attention's v5p backward: core 1 branches from the prologue to the
  # exit bundle, a region the dump never starts; core 0 issues every bundle.
  s = bundles.parse(_core0_only_kernel("s1_s2"), "core0")
  assert s.bundles == 9 and s.loops == () and s.static_cycles() == 9
  # the same branch on any other predicate is still refused
  with pytest.raises(bundles.ScheduleFormatError, match="unknown region 4"):
    bundles.parse(_core0_only_kernel("s9_s9"), "other")


def test_slot_counts_loop_ending_in_the_last_bundles():
  # libtpu dumps XLA fusions whose back-branch is the last bundle or one
  # before it: the loop's delay slots lie past the dump.
  text = ("   0   :  { %1 = vadd.f32 %v1, %v2 }\n"
          "   0x1   :  { %2 = vmul.f32 %v3, %v4  ;;  %3 = vmul.f32 %v3, %v4 }\n"
          "   0x2   :  { %4 = vld [vmem:[#a]] }\n")
  s = bundles.Schedule("tail_loop", 3, (bundles.Loop(1, 2 + bundles.BRANCH_DELAY_SLOTS, 5, ()),))
  assert bundles.slot_counts(text, s) == dict(valu=1 + 2 * 5, load=5)


@pytest.mark.tpu_compile
def test_end_to_end_dump(tmp_path):
  """Compiles the tiny kernel for v5e with the dump flag and parses it (needs libtpu)."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu not installed")
  import tpu_schedule
  out = tmp_path / "tiny.txt"
  tpu_schedule.write_test_data(str(out))
  s = bundles.parse(out.read_text(), "tiny_accumulate.1")
  (loop,) = s.loops
  assert loop.trips == 10 and len(loop.when_regions()) == 1


# --- the anchors (no libtpu: the arithmetic of bench/tpu_schedule.py) --------

def _schedule_module():
  import tpu_schedule
  return tpu_schedule


def test_softmax_limit_is_model_flops_at_peak():
  """The issue's reference point: v5e, 32k, 12 heads, H=64, forward ~ 12.6M cycles."""
  ts = _schedule_module()
  from pallas_polysketch.tpu_config import GENERATIONS
  g = GENERATIONS["v5e"]
  fwd = ts.softmax_model_flops("fwd", 1, 12, 32768, 64)
  assert fwd == 2 * 2 * 12 * 32768 ** 2 * 64 / 2
  assert fwd / (g.peak_bf16_flops / g.clock_hz) == pytest.approx(12.56e6, rel=0.01)
  assert ts.softmax_model_flops("vjp", 1, 12, 32768, 64) == 3 * fwd


def test_splash_grid_model():
  """Causal splash: the full (heads, q blocks, kv blocks) grid; `should_run`
  (the largest region) at the causal fraction of blocks, the others once per
  inner walk (kv blocks for fwd / dq, q blocks for dkv)."""
  ts = _schedule_module()
  job = dict(B=1, N=12, splash_blocks=[512, 1024, 512])
  spans = [bundles.Span(branch=0, target=10, predicate="p"),
           bundles.Span(branch=20, target=200, predicate="q")]
  steps, frac = ts.kernel_model("splash_mha_fwd_no_residuals.1", job, 8192)
  assert steps == 12 * 16 * 8
  causal = ts._causal_fraction(16, 512, 8, 1024)
  assert 0.5 < causal < 0.6
  assert frac(spans) == [1 / 8, causal]
  _, frac_dkv = ts.kernel_model("splash_mha_dkv_no_residuals.1", job, 8192)
  assert frac_dkv(spans) == [1 / 16, causal]
  # A block longer than the sequence: no model (that T is left out of the table).
  assert ts.kernel_model("splash_mha_fwd_no_residuals.1", dict(job, splash_blocks=[2048, 512, 512]),
                         1024) is None


def test_fastest_anchor_per_kernel():
  """Each kernel at its own fastest blocks, the XLA ops of the fastest whole
  configuration; configurations with a block longer than T are left out."""
  ts = _schedule_module()
  cands = {
      "512x512x512": {"per_T": {4096: dict(kernels={"fwd.1": 10, "dq.1": 30}, other=5, total=45),
                                1024: dict(kernels={"fwd.1": 1, "dq.1": 3}, other=1, total=5)}},
      "1024x1024x512": {"per_T": {4096: dict(kernels={"fwd.1": 12, "dq.1": 20}, other=7, total=39)}},
      "2048x2048x2048": {"per_T": {4096: dict(kernels={"fwd.1": 1, "dq.1": 1}, other=0, total=2),
                                   1024: dict(kernels={"fwd.1": 0, "dq.1": 0}, other=0, total=0)}},
  }
  total, blocks = ts._fastest({k: v for k, v in cands.items() if k != "2048x2048x2048"}, 4096)
  assert total == 10 + 20 + 7 and blocks == {"fwd": "512x512x512", "dq": "1024x1024x512"}
  assert ts._fastest(cands, 1024) == (5, {"fwd": "512x512x512", "dq": "512x512x512"})
  assert ts._fastest({"4096": cands["512x512x512"]}, 1024) is None


# --- kernels dumped once, run several times ------------------------------------
# tests/data/dedup_v5e_*: the `inlined_call` bundles of a real TLP schedule and
# its deduplication map (v5e, libtpu 0.0.42.1): the learned-sketch features of
# q and of k, one Pallas kernel compiled once and called twice.

def test_program_calls_counts_deduplicated_kernels():
  tlp = open(os.path.join(HERE, "data", "dedup_v5e_tlp_calls.txt")).read()
  dedup = open(os.path.join(HERE, "data", "dedup_v5e_deduplication-map.txt")).read()
  calls = bundles.program_calls(tlp, dedup)
  assert calls["learned_sketch_forward.2"] == 2
  assert "learned_sketch_forward.3" not in calls      # folded into its key
  assert calls["copy.22"] == 2 and calls["copy.16"] == 1
  assert calls["pad_maximum_fusion.1"] == 2 and calls["<late-initialization>"] == 1
  assert sum(calls.values()) == tlp.count("inlined_call")
  # without the map every call counts under its own name
  plain = bundles.program_calls(tlp)
  assert plain["learned_sketch_forward.2"] == plain["learned_sketch_forward.3"] == 1
  with pytest.raises(bundles.ScheduleFormatError):
    bundles.program_calls("no calls here")


def test_program_cycles_count_every_run():
  ts = _schedule_module()
  one = lambda name, n: bundles.Schedule(name, n, ()).to_json()
  rec = dict(job=dict(T=1024), schedules=[one("TLP", 10), one("fusion.1", 100)],
             calls={"fusion.1": 3, "<late-initialization>": 1})
  got = ts.summarise_program([rec], [1024, 2048])
  assert got["compiled"][1024] == 10 + 3 * 100
  assert got["per_T"][2048]["total"] == pytest.approx(2 * 310)
  old = dict(rec)
  del old["calls"]                                      # records before call counts
  assert ts.summarise_program([old], [1024])["compiled"][1024] == 110


def test_crossover_needs_every_larger_T():
  ts = _schedule_module()
  rows = [dict(T=t, speedup_conservative=x) for t, x in
          ((1024, 1.2), (2048, 0.9), (4096, 1.1), (8192, 2.0))]
  assert ts.crossover(rows) == 4096
  rows[-1]["speedup_conservative"] = 0.99
  assert ts.crossover(rows) is None


HLO = os.path.join(HERE, "data", "compiled_vjp_v5e_h64.hlo.txt")


def test_layout_copies_on_a_compiled_program():
  """tests/data/compiled_vjp_v5e_h64.hlo.txt: `compiled.as_text()` of our
  fwd+VJP (v5e, B=1, T=4096, N=12, H=64, r=32; libtpu 0.0.42.1), with the
  metadata / backend_config attributes cut off each line. Saved 2026-11-25:
  its backward kernels predate later changes (the dq kernel still reads q, k
  and dO there); it tests the parser, not today's kernels."""
  text = open(HLO).read()
  copies = bundles.layout_copies(text)
  names = [c["name"] for c in copies]
  # Layout changes only: `copy-start`s that move an array to VMEM (S(1)) in
  # its own layout are not copies, nor a convert fusion; a copy-only fusion is.
  assert not any(n.startswith(("copy-start", "convert")) for n in names)
  assert len(names) == len(set(names)) == 12
  assert "copy_bitcast_fusion" in names
  by_name = {c["name"]: c["bytes"] for c in copies}
  assert by_name["copy"] == 4096 * 12 * 64 * 2            # q, bf16, [B,T,N,H] -> H minor
  assert by_name["copy.3"] == 4096 * 12 * 32 * 2          # a feature array
  assert by_name["copy.9"] == 12 * 4096 * 2 * 4           # f32 [.., 2] row terms


def test_layout_copies_rules():
  text = """HloModule m

%fused_computation (p: f32[8,128]) -> f32[128,8] {
  %p = f32[8,128]{1,0:T(8,128)} parameter(0)
  %copy.7 = f32[8,128]{0,1:T(8,128)} copy(%p)
  ROOT %bitcast = f32[128,8]{1,0:T(8,128)} bitcast(%copy.7)
}

%fused_computation.1 (p.1: f32[8,128]) -> bf16[8,128] {
  %p.1 = f32[8,128]{1,0:T(8,128)} parameter(0)
  ROOT %convert = bf16[8,128]{1,0:T(8,128)(2,1)} convert(%p.1)
}

ENTRY %main (a: f32[8,128]) -> f32[8,128] {
  %a = f32[8,128]{1,0:T(8,128)} parameter(0)
  %copy-start = (f32[8,128]{1,0:T(8,128)S(1)}, f32[8,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%a)
  %copy-done = f32[8,128]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  %copy = bf16[8,128]{0,1:T(8,128)(2,1)} copy(%copy-done)
  %copy.1 = f32[8,128]{1,0:T(2,128)} copy(%a)
  %copy_fusion = f32[128,8]{1,0:T(8,128)} fusion(%a), kind=kLoop, calls=%fused_computation
  %convert_fusion = bf16[8,128]{1,0:T(8,128)(2,1)} fusion(%a), kind=kLoop, calls=%fused_computation.1
  ROOT %copy.2 = f32[8,128]{1,0:T(8,128)S(1)} copy(%a)
}
"""
  got = {c["name"]: c["bytes"] for c in bundles.layout_copies(text)}
  # A transpose, a retiling, a copy-only fusion (counted once, not again for
  # the copy inside it); not a memory-space move, not a convert.
  assert got == {"copy": 8 * 128 * 2, "copy.1": 8 * 128 * 4, "copy_fusion": 8 * 128 * 4}


def test_fusion_breakdown_counts_every_run(sched):
  import fusion_breakdown
  text = open(DATA).read()
  slots = bundles.slot_counts(text, sched)
  rec = {"schedules": [sched.to_json(), {"name": "odd", "format_error": "x"}],
         "slots": {sched.name: slots}, "calls": {sched.name: 3}}
  b = fusion_breakdown.breakdown(rec)
  assert b["total"] == 3 * sched.static_cycles()
  assert b["valu_floor"] == 3 * slots["valu"] / fusion_breakdown.VALU_SLOTS
  assert b["unparsed"] == ["odd"]
  (k,) = b["kernels"]
  assert k["per_cycle"]["valu"] == slots["valu"] / sched.static_cycles()
  md = fusion_breakdown.markdown(dict(program="p", gen="v5e", T=1, libtpu="x", command="c",
                                      breakdown=b))
  assert f"| {sched.name} | 3 | " in md and "Unparsed (not counted): odd." in md
