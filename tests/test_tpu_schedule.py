"""The TPU schedule parser (bench/bundles.py) on a saved real dump, without libtpu.

tests/data/tiny_accumulate_v5e_final_bundles.txt was written by
`python bench/tpu_schedule.py --write-test-data PATH` (jax 0.10.2, libtpu
0.0.42.1, v5e): a grid (2, 4) kernel, blocks (128, 128), with one
`pl.when(program_id(1) == 0)` region.
"""
import importlib.util
import os
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
