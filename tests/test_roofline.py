"""Arithmetic of the roofline model in bench/roofline.py (no timing, no TPU)."""
import importlib.util
import sys
from pathlib import Path

import pytest

from pallas_polysketch.tpu_config import GENERATIONS

_PATH = Path(__file__).resolve().parents[1] / "bench" / "roofline.py"
_spec = importlib.util.spec_from_file_location("bench_roofline", _PATH)
R = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = R  # dataclasses look their module up
_spec.loader.exec_module(R)


@pytest.mark.parametrize("gen", sorted(GENERATIONS))
@pytest.mark.parametrize("shape", R.SHAPES, ids=lambda s: s.name)
def test_polysketch_linear_flash_quadratic(gen, shape):
  g = GENERATIONS[gen]
  for t in (4096, 16384):
    for cost in (R.polysketch_forward_cost, R.polysketch_backward_cost):
      a, b = cost(shape, t, g), cost(shape, 2 * t, g)
      assert b.flops == pytest.approx(2 * a.flops)
      assert b.bytes == pytest.approx(2 * a.bytes)
    fa, fb = R.flash_forward_cost(shape, t), R.flash_forward_cost(shape, 2 * t)
    assert fb.flops == pytest.approx(4 * fa.flops)
    assert R.flash_backward_cost(shape, t).flops == pytest.approx(2.5 * fa.flops)
  # Flash bytes grow super-linearly (K, V re-read per q block).
  assert R.flash_forward_cost(shape, 65536).bytes > 2 * R.flash_forward_cost(shape, 32768).bytes


def test_flash_forward_flops_formula():
  s = R.GPT2
  t = 32768
  assert R.flash_forward_cost(s, t).flops == 4 * t * t * s.head_dim * s.heads * s.batch / 2


def test_forward_bytes_count_each_tensor():
  s, g, t = R.GPT2, GENERATIONS["v5e"], 1024
  tok = s.batch * s.heads * t
  kernel = R.polysketch_forward_cost(s, t, g)
  # q, k, v, f_q, f_k in (bf16), o out (bf16) and den (float32).
  assert kernel.bytes == tok * (4 * s.head_dim * 2 + 2 * s.sketch_dim * 2 + 4)
  old = R.polysketch_forward_cost(s, t, g, transposes=True)
  # The old layout's transposes: q, k, v, f_q, f_k in and o out, each one read + one write.
  assert old.bytes - kernel.bytes == 2 * tok * (4 * s.head_dim * 2 + 2 * s.sketch_dim * 2)


def test_backward_bytes_count_each_kernel_operand():
  s, g, t = R.GPT2, GENERATIONS["v5e"], 1024
  tok = s.batch * s.heads * t
  x, f, f32f, row = tok * s.head_dim * 2, tok * s.sketch_dim * 2, tok * s.sketch_dim * 4, tok * 4
  parts = R.polysketch_backward_cost(s, t, g).parts
  assert parts["o_residual_f32"] == x                               # O written in float32, not bf16
  assert parts["xla_prep"] == 3 * x + 4 * row                       # O (f32), dO, den in; 3 row terms out
  assert parts["kernel_in"] == (2 * x + 2 * f + 3 * row) + (4 * x + 2 * f + 3 * row)
  assert parts["kernel_out"] == 3 * x + 2 * f32f                    # dq, dk, dv; df_q, df_k
  assert parts["xla_cast"] == 2 * (f32f + f)


@pytest.mark.parametrize("gen", sorted(GENERATIONS))
def test_bound_classification_consistent(gen):
  g = GENERATIONS[gen]
  for row in R.build_model(R.SHAPES, (1024, 32768, 131072), (gen,)):
    for key in ("polysketch_fwd", "polysketch_fwd_old_layout", "polysketch_fwdbwd",
                "flash_fwd", "flash_fwdbwd"):
      p = row[key]
      assert p["time_tc_s"] == max(p["compute_s"], p["memory_s"])
      assert p["bound"] == ("compute" if p["intensity"] >= R.ridge_point(g) else "HBM")
      assert p["time_chip_s"] == pytest.approx(p["time_tc_s"] / g.tensorcores_per_chip)
    assert row["speedup_fwd"] == pytest.approx(
        row["flash_fwd"]["time_tc_s"] / row["polysketch_fwd"]["time_tc_s"])


def test_megacore_per_tensorcore_figures():
  for name in ("v4", "v5p"):
    g = GENERATIONS[name]
    assert g.tensorcores_per_chip == 2
    assert g.peak_bf16_flops == g.peak_bf16_flops_per_chip / 2
  # Documented chip figures (Cloud TPU system-architecture pages).
  assert GENERATIONS["v5e"].peak_bf16_flops_per_chip == 197e12
  assert GENERATIONS["v5e"].hbm_bytes_per_s_per_chip == 819e9


def test_speedup_grows_with_seq():
  rows = R.build_model((R.GPT2,), R.DEFAULT_SEQS, ("v5e",))
  ups = [r["speedup_fwd"] for r in sorted(rows, key=lambda r: r["seq"])]
  assert all(b > a for a, b in zip(ups, ups[1:]))


def test_targets_and_tables_render():
  rows = R.build_model((R.GPT2,), (16384, 32768), ("v5e",))
  tg = R.targets(rows)["v5e"]
  assert tg["fwd_ge_8x"] == (tg["speedup_fwd"] >= 8)
  assert "32k" in R.format_table(rows, "v5e", R.GPT2.name)
  assert R.format_table(rows, "v5e", R.GPT2.name, markdown=True).count("\n|") >= 3


def test_markdown_report_has_every_table():
  rows = R.build_model(R.SHAPES, (4096, 32768), ("v5e", "v6e"))
  tg = R.targets(rows, seq=32768)
  md = R.markdown_report(rows, tg, None)
  for g, t in tg.items():
    assert f"| {g} | {t['speedup_fwd']:.1f} | {t['fwd_bound']} (" in md
  for shape in R.SHAPES:
    for g in ("v5e", "v6e"):
      assert R.format_table(rows, g, shape.name, markdown=True) in md
  assert "Compiled" not in md      # nothing compiled, no compiled tables
