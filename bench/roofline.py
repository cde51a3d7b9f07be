"""Roofline model of the PolySketch Pallas kernels against causal FlashAttention.

For each TPU generation (v4, v5e, v5p, v6e) and T = 1k ... 128k this counts the
flops and HBM bytes of the PolySketch forward and forward+backward (the kernels
in `pallas_polysketch`, reading the public layout, plus the XLA row terms and
casts around them; the forward also with the transposes the kernels needed
before issue 13, for comparison),
projects time = max(flops / peak bf16, bytes / HBM bandwidth) and classifies
the op as compute- or HBM-bound, next to an idealised causal FlashAttention at
the same shape. Optionally it compiles the kernels with the real TPU compiler
(libtpu on a CPU host) and compares the model with `cost_analysis()`, and
records `memory_analysis()` per generation.

    JAX_PLATFORMS=cpu python bench/roofline.py            # model + compiled check
    JAX_PLATFORMS=cpu python bench/roofline.py --no-compile

Writes bench/results/roofline.json, bench/results/roofline.png,
bench/results/roofline_compiled.json and bench/results/roofline.md (the tables
of bench/ROOFLINE.md); prints tables. See bench/ROOFLINE.md for
the model, its assumptions and the sources of the hardware figures.

Counting conventions
--------------------
* PolySketch flops are exactly `forward_flops` / `backward_flops` (what the
  kernels' `pl.CostEstimate` reports), with the generation's default
  local_tile (its MXU width), so the diagonal-block work depends on the chip.
* Bytes: every kernel operand is read once and every output written once
  (BlockSpec streaming; the prefix state never leaves VMEM); every XLA
  transpose or elementwise prep op is one read pass of its inputs plus one
  write pass of its outputs (no fusion across the pallas_call boundary).
* FlashAttention (causal): forward flops 4*T^2*H*N*B / 2, backward 2.5x the
  forward (FlashAttention-2 accounting: 5 matmuls against 2). Bytes: q read
  and o + logsumexp written once; K and V re-read once per q block over the
  causal prefix (T^2/2 keys per block_q queries); backward: q, k, v, o, dO
  read, dq, dk, dv written, the XLA prep of di = rowsum(dO * O), plus the dkv
  kernel re-reading q, dO, lse, di per k block and the dq kernel re-reading k,
  v per q block, over the causal half. Perfect causal block skipping and
  large blocks (512) are assumed: this favours FlashAttention, so the
  speed-ups are conservative.
* Megacore: `TpuGeneration` holds per-chip figures; per TensorCore they are
  divided by tensorcores_per_chip (v4, v5p: 2). `time_tc` is the whole
  problem run by one TensorCore at the per-TC peak and per-TC share of HBM
  bandwidth; `time_chip` = time_tc / tensorcores_per_chip, the batch x head
  grid axes being "parallel" and split over the two TensorCores of a megacore
  chip (12 heads split evenly). Intensity, boundedness and speed-ups are the
  same either way.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

from pallas_polysketch._pallas_backward import backward_flops
from pallas_polysketch._pallas_forward import forward_flops
from pallas_polysketch.tpu_config import GENERATIONS, TpuGeneration

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SEQS = tuple(1024 * 2 ** i for i in range(8))  # 1k ... 128k
DEFAULT_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
# Topologies the TPU compiler accepts from a CPU host (DESIGN §3.4).
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One attention layer's shape (T varies separately)."""
  name: str
  batch: int = 1
  heads: int = 12
  head_dim: int = 64
  sketch_dim: int = 32
  block_size: int = 256
  itemsize: int = 2          # q, k, v, o, dO (bf16)
  feature_itemsize: int = 2  # q_features, k_features (bf16)
  degree: int = 4


GPT2 = Shape("gpt2_h64_r32")
WIDE = Shape("h128_r64", head_dim=128, sketch_dim=64)
SHAPES = (GPT2, WIDE)


@dataclasses.dataclass(frozen=True)
class Cost:
  flops: float
  bytes: float
  parts: dict  # name -> bytes, for the record

  def __add__(self, other: "Cost") -> "Cost":
    parts = dict(self.parts)
    for k, v in other.parts.items():
      parts[k] = parts.get(k, 0) + v
    return Cost(self.flops + other.flops, self.bytes + other.bytes, parts)


def _cost(flops, parts):
  return Cost(float(flops), float(sum(parts.values())), {k: float(v) for k, v in parts.items()})


# --------------------------------------------------------------------------
# PolySketch (causal, local_exact=True), mirroring polysketch_forward/backward.
# --------------------------------------------------------------------------
def local_tile_for(gen: TpuGeneration, shape: Shape) -> int:
  """The kernels' default local_tile: the MXU width, capped at the block."""
  return min(gen.mxu_width, shape.block_size)


def polysketch_forward_cost(shape: Shape, seq: int, gen: TpuGeneration, *,
                            transposes: bool = False) -> Cost:
  """Flops and HBM bytes of the causal forward.

  The kernels read q, k, v, f_q, f_k and write o in the public [B, T, N, H]
  layout (issue 13 item 1); transposes=True adds the XLA copies they needed
  before that, for comparison."""
  s = shape
  tokens = s.batch * s.heads * seq          # token-heads
  x = tokens * s.head_dim * s.itemsize      # one [B, T, N, H] tensor
  f = tokens * s.sketch_dim * s.feature_itemsize
  den = tokens * 4                          # float32 [B, N, 1, T]
  flops = forward_flops(s.batch, s.heads, seq, s.head_dim, s.sketch_dim, s.block_size,
                        causal=True, local_tile=local_tile_for(gen, s))
  parts = {"kernel_in": 3 * x + 2 * f, "kernel_out": x + den}
  if transposes:
    # q, k -> [B,N,T,H]; v, f_q, f_k -> [B,N,D,T]; o^T -> [B,T,N,H]: read + write each.
    parts["xla_transposes"] = 2 * (3 * x + 2 * f) + 2 * x
  return _cost(flops, parts)


def polysketch_backward_cost(shape: Shape, seq: int, gen: TpuGeneration) -> Cost:
  """Flops and HBM bytes of the backward alone: the XLA row terms, the dq and
  the dkv kernel (`_pallas_backward.polysketch_backward`), and the features'
  cotangents cast to their dtype."""
  s = shape
  tokens = s.batch * s.heads * seq
  x = tokens * s.head_dim * s.itemsize
  f = tokens * s.sketch_dim * s.feature_itemsize
  f32f = tokens * s.sketch_dim * 4          # df_q, df_k kernel outputs (float32)
  row = tokens * 4                          # one float32 per token-head
  k1, k2 = backward_flops(s.batch, s.heads, seq, s.head_dim, s.sketch_dim, s.block_size,
                          causal=True, local_tile=local_tile_for(gen, s))
  # Differentiated, the forward writes O in float32 (its residual; x more than
  # the bf16 o counted in the forward), and the row terms (1/den, dden, s) read
  # it with dO and den and write three per token-head.
  prep_flops = tokens * (3 * s.head_dim + 2)
  parts = {"o_residual_f32": x, "xla_prep": (2 * x + x + row) + 3 * row}
  # dq kernel: v, f_q, f_k, dO, the row terms in; df_q (float32) out.
  # dkv kernel: q, k, v, dO, f_q, f_k, the row terms in; the local blocks'
  # dk and dq, dv, df_k (float32) out.
  parts["kernel_in"] = (2 * x + 2 * f + 3 * row) + (4 * x + 2 * f + 3 * row)
  parts["kernel_out"] = f32f + (3 * x + f32f)
  parts["xla_cast"] = 2 * (f32f + f)        # df_q, df_k read, written in the features' dtype
  return _cost(k1 + k2 + prep_flops, parts)


# --------------------------------------------------------------------------
# Causal FlashAttention (idealised).
# --------------------------------------------------------------------------
def flash_forward_cost(shape: Shape, seq: int, *, block_q: int = 512) -> Cost:
  s = shape
  bn = s.batch * s.heads
  flops = 4 * seq * seq * s.head_dim * bn / 2
  x = bn * seq * s.head_dim * s.itemsize
  lse = bn * seq * 4
  # Each q block reads the K, V blocks at or below the diagonal: on average
  # (T + block_q) / 2 keys per q block, T / block_q q blocks.
  kv_rereads = bn * 2 * (seq / block_q) * ((seq + block_q) / 2) * s.head_dim * s.itemsize
  parts = {"q_in": x, "kv_reads": kv_rereads, "o_out": x + lse}
  return _cost(flops, parts)


def flash_backward_cost(shape: Shape, seq: int, *, block_q: int = 512,
                        block_k: int = 512) -> Cost:
  s = shape
  bn = s.batch * s.heads
  fwd_flops = 4 * seq * seq * s.head_dim * bn / 2
  x = bn * seq * s.head_dim * s.itemsize
  row = bn * seq * 4
  causal_pairs = lambda blk: (seq / blk) * ((seq + blk) / 2)   # rows streamed per pass
  # di = rowsum(dO * O) in XLA: read dO, O, write di.
  prep = 2 * x + row
  # dkv kernel: per k block, stream q, dO (H each), lse, di over the causal suffix;
  # k, v read once; dk, dv written once.
  dkv = bn * causal_pairs(block_k) * (2 * s.head_dim * s.itemsize + 2 * 4) + 2 * x + 2 * x
  # dq kernel: per q block, stream k, v over the causal prefix; q, dO, lse, di
  # read once; dq written once.
  dq = bn * causal_pairs(block_q) * 2 * s.head_dim * s.itemsize + 2 * x + 2 * row + x
  parts = {"xla_prep": prep, "dkv_kernel": dkv, "dq_kernel": dq}
  return _cost(2.5 * fwd_flops, parts)


# --------------------------------------------------------------------------
# Projection.
# --------------------------------------------------------------------------
def project(cost: Cost, gen: TpuGeneration) -> dict:
  """Roofline time per TensorCore (whole problem on one TC) and per chip."""
  compute_s = cost.flops / gen.peak_bf16_flops
  memory_s = cost.bytes / gen.hbm_bytes_per_s
  time_tc = max(compute_s, memory_s)
  return {
      "flops": cost.flops,
      "bytes": cost.bytes,
      "intensity": cost.flops / cost.bytes,
      "compute_s": compute_s,
      "memory_s": memory_s,
      "time_tc_s": time_tc,
      "time_chip_s": time_tc / gen.tensorcores_per_chip,
      "bound": "compute" if compute_s >= memory_s else "HBM",
  }


def ridge_point(gen: TpuGeneration) -> float:
  """Flops per byte above which an op is compute-bound."""
  return gen.peak_bf16_flops / gen.hbm_bytes_per_s


def model_row(shape: Shape, seq: int, gen: TpuGeneration, *, block_q: int = 512) -> dict:
  ps_fwd = polysketch_forward_cost(shape, seq, gen)
  ps_bwd = polysketch_backward_cost(shape, seq, gen)
  fa_fwd = flash_forward_cost(shape, seq, block_q=block_q)
  fa_bwd = flash_backward_cost(shape, seq, block_q=block_q, block_k=block_q)
  ps_old_layout = polysketch_forward_cost(shape, seq, gen, transposes=True)
  row = {
      "generation": gen.name, "shape": shape.name, "seq": seq,
      "local_tile": local_tile_for(gen, shape),
      "polysketch_fwd": project(ps_fwd, gen),
      "polysketch_fwd_old_layout": project(ps_old_layout, gen),
      "polysketch_fwdbwd": project(ps_fwd + ps_bwd, gen),
      "flash_fwd": project(fa_fwd, gen),
      "flash_fwdbwd": project(fa_fwd + fa_bwd, gen),
      "bytes_parts": {"polysketch_fwd": ps_fwd.parts, "polysketch_bwd": ps_bwd.parts,
                      "flash_fwd": fa_fwd.parts, "flash_bwd": fa_bwd.parts},
  }
  row["speedup_fwd"] = row["flash_fwd"]["time_tc_s"] / row["polysketch_fwd"]["time_tc_s"]
  row["speedup_fwd_old_layout"] = (row["flash_fwd"]["time_tc_s"]
                                   / row["polysketch_fwd_old_layout"]["time_tc_s"])
  row["speedup_fwdbwd"] = row["flash_fwdbwd"]["time_tc_s"] / row["polysketch_fwdbwd"]["time_tc_s"]
  return row


def build_model(shapes=SHAPES, seqs=DEFAULT_SEQS, generations=DEFAULT_GENERATIONS, *,
                block_q: int = 512) -> list[dict]:
  return [model_row(shape, seq, GENERATIONS[g], block_q=block_q)
          for shape in shapes for g in generations for seq in seqs]


def targets(rows: list[dict], *, seq: int = 32768, shape: str = GPT2.name) -> dict:
  """The numbers issue 4/5 ask for, per generation, at the GPT-2 shape."""
  out = {}
  for r in rows:
    if r["seq"] != seq or r["shape"] != shape:
      continue
    out[r["generation"]] = {
        "speedup_fwd": r["speedup_fwd"],
        "speedup_fwd_old_layout": r["speedup_fwd_old_layout"],
        "speedup_fwdbwd": r["speedup_fwdbwd"],
        "fwd_bound": r["polysketch_fwd"]["bound"],
        "fwd_old_layout_bound": r["polysketch_fwd_old_layout"]["bound"],
        "fwd_intensity": r["polysketch_fwd"]["intensity"],
        "fwd_old_layout_intensity": r["polysketch_fwd_old_layout"]["intensity"],
        "ridge": ridge_point(GENERATIONS[r["generation"]]),
        "fwd_ge_8x": r["speedup_fwd"] >= 8.0,
        "fwdbwd_ge_6x": r["speedup_fwdbwd"] >= 6.0,
    }
  return out


# --------------------------------------------------------------------------
# Terminal and markdown tables.
# --------------------------------------------------------------------------
def _k(seq):
  return f"{seq // 1024}k"


def _t(s):
  if s >= 1:
    return f"{s:.2f} s"
  if s >= 1e-3:
    return f"{s * 1e3:.2f} ms"
  return f"{s * 1e6:.1f} us"


def format_table(rows: list[dict], generation: str, shape: str, *, markdown=False) -> str:
  gen = GENERATIONS[generation]
  head = ["T", "PS fwd GFLOP", "PS fwd MB", "PS AI", "PS fwd t/TC", "bound",
          "FA fwd t/TC", "FA AI", "bound", "fwd x", "fwd x (old layout)",
          "PS f+b t/TC", "bound", "FA f+b t/TC", "f+b x"]
  lines = []
  for r in rows:
    if r["generation"] != generation or r["shape"] != shape:
      continue
    p, pb = r["polysketch_fwd"], r["polysketch_fwdbwd"]
    f, fb = r["flash_fwd"], r["flash_fwdbwd"]
    lines.append([_k(r["seq"]), f"{p['flops'] / 1e9:.1f}", f"{p['bytes'] / 1e6:.0f}",
                  f"{p['intensity']:.0f}", _t(p["time_tc_s"]), p["bound"],
                  _t(f["time_tc_s"]), f"{f['intensity']:.0f}", f["bound"],
                  f"{r['speedup_fwd']:.1f}", f"{r['speedup_fwd_old_layout']:.1f}",
                  _t(pb["time_tc_s"]), pb["bound"], _t(fb["time_tc_s"]),
                  f"{r['speedup_fwdbwd']:.1f}"])
  title = (f"{generation} ({shape}): per TC {gen.peak_bf16_flops / 1e12:.1f} TFLOP/s bf16, "
           f"{gen.hbm_bytes_per_s / 1e9:.0f} GB/s HBM, ridge {ridge_point(gen):.0f} flop/B, "
           f"{gen.tensorcores_per_chip} TC/chip")
  if markdown:
    out = [f"**{title}**", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    out += ["| " + " | ".join(l) + " |" for l in lines]
    return "\n".join(out)
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
  fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def markdown_report(rows: list[dict], targets_32k: dict, compiled: dict | None) -> str:
  """The tables of bench/ROOFLINE.md: targets at 32k, the model per shape and
  generation, and (when compiled) the compiler's counts and memory."""
  out = ["#### Targets (T = 32k, GPT-2 head shape H=64, r=32, b=256, bf16)", "",
         "| gen | fwd x vs flash (model) | fwd bound (AI vs ridge) | old layout: x, bound (AI) "
         "| fwd+bwd x (model) |", "|---|---|---|---|---|"]
  for g, t in targets_32k.items():
    out.append(f"| {g} | {t['speedup_fwd']:.1f} | {t['fwd_bound']} ({t['fwd_intensity']:.0f} vs "
               f"{t['ridge']:.0f}) | {t['speedup_fwd_old_layout']:.1f}, {t['fwd_old_layout_bound']} "
               f"({t['fwd_old_layout_intensity']:.0f}) | {t['speedup_fwdbwd']:.1f} |")
  gens = list(dict.fromkeys(r["generation"] for r in rows))
  for shape in SHAPES:
    out += ["", f"#### {shape.name} (B={shape.batch}, N={shape.heads}, H={shape.head_dim}, "
            f"r={shape.sketch_dim}, b={shape.block_size}, bf16)"]
    for g in gens:
      out += ["", format_table(rows, g, shape.name, markdown=True)]
  if compiled and compiled.get("rows"):
    out += ["", "#### Compiled (libtpu, CPU host) vs model", "",
            "| gen | shape | T | kind | flops model | flops compiled | bytes model | bytes compiled "
            "| compiled AI | bound (compiled counts) | x vs flash (compiled counts) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    mem = []
    for c in compiled["rows"]:
      head = f"| {c['generation']} | {c['shape']} | {_k(c['seq'])} | {c['kind']} |"
      if "error" in c:
        out.append(f"{head} failed: {c['error'][:80]} |||||||")
        continue
      p = c["compiled_projection"]
      out.append(f"{head} {c['model_flops']:.4g} | {c['flops']:.4g} | {c['model_bytes']:.4g} | "
                 f"{c['bytes_accessed']:.4g} ({c['bytes_ratio']:.2f}x) | {p['intensity']:.0f} | "
                 f"{p['bound']} | {c['compiled_speedup_vs_flash']:.1f} |")
      m = c["memory"]
      mem.append(f"{head} " + " | ".join(f"{m.get(k, 0) / 2**20:.1f}" for k in (
          "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
                 + f" | {m.get('generated_code_size_in_bytes', 0) / 2**10:.0f} |")
    out += ["", "#### Compiled memory_analysis (MiB)", "",
            "| gen | shape | T | kind | arguments | outputs | temp | generated code (KiB) |",
            "|---|---|---|---|---|---|---|---|"] + mem
  return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# Plot.
# --------------------------------------------------------------------------
def plot(rows: list[dict], path: Path, shape: str = GPT2.name,
         generations=DEFAULT_GENERATIONS) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(generations), figsize=(5 * len(generations), 4.2),
                           squeeze=False)
  for ax, g in zip(axes[0], generations):
    rs = sorted((r for r in rows if r["generation"] == g and r["shape"] == shape),
                key=lambda r: r["seq"])
    seqs = [r["seq"] for r in rs]
    for key, label, style in (("polysketch_fwd", "PolySketch fwd", "C0-"),
                              ("flash_fwd", "Flash fwd (causal)", "C1-"),
                              ("polysketch_fwdbwd", "PolySketch fwd+bwd", "C0--"),
                              ("flash_fwdbwd", "Flash fwd+bwd", "C1--")):
      ax.loglog(seqs, [r[key]["time_tc_s"] * 1e3 for r in rs], style, marker="o",
                ms=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [_k(s) for s in seqs])
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("projected time per TensorCore (ms)")
    ax.set_title(f"TPU {g}: {shape}")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(seqs, [r["speedup_fwd"] for r in rs], "C2:", marker="s", ms=3,
             label="speed-up fwd")
    ax2.plot(seqs, [r["speedup_fwdbwd"] for r in rs], "C3:", marker="^", ms=3,
             label="speed-up fwd+bwd")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_ylabel("speed-up over Flash (x)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
  fig.suptitle("Roofline: PolySketch (B=1, N=12, b=256, bf16) vs causal FlashAttention")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# --------------------------------------------------------------------------
# Compiled cost / memory analysis with the real TPU compiler (libtpu).
# --------------------------------------------------------------------------
def libtpu_available() -> str | None:
  """None if a TPU topology can be built here, else the reason it cannot."""
  try:
    from jax.experimental import topologies
    topologies.get_topology_desc(TOPOLOGIES["v5e"], "tpu")
  except Exception as e:  # noqa: BLE001 - any failure means "no libtpu"
    return f"{type(e).__name__}: {e}"
  return None


def _first(analysis):
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else {}
  return analysis or {}


def compile_for(generation: str, shape: Shape, seq: int, *, grad: bool) -> dict:
  """Lowers and compiles the op (or jax.grad of it) for one TPU generation."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies
  from pallas_polysketch import polysketch_attention
  from pallas_polysketch.tpu_config import TileConfig

  topo = topologies.get_topology_desc(TOPOLOGIES[generation], "tpu")
  sharding = jax.sharding.make_single_device_sharding(topo.devices[0])
  dt = jnp.bfloat16
  s = shape
  x = jax.ShapeDtypeStruct((s.batch, seq, s.heads, s.head_dim), dt, sharding=sharding)
  f = jax.ShapeDtypeStruct((s.batch, seq, s.heads, s.sketch_dim), dt, sharding=sharding)
  attn = functools.partial(polysketch_attention, degree=s.degree, block_size=s.block_size,
                           causal=True, local_exact=True, implementation="pallas",
                           tile_config=TileConfig(generation=generation))
  if grad:
    def fn(q, k, v, fq, fk):
      return jax.grad(lambda *a: jnp.sum(attn(*a).astype(jnp.float32)),
                      argnums=(0, 1, 2, 3, 4))(q, k, v, fq, fk)
  else:
    fn = attn
  t0 = time.perf_counter()
  compiled = jax.jit(fn, in_shardings=(sharding,) * 5).lower(x, x, x, f, f).compile()
  seconds = time.perf_counter() - t0
  cost = _first(compiled.cost_analysis())
  mem = compiled.memory_analysis()
  mem_fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {
      "generation": generation, "shape": shape.name, "seq": seq,
      "kind": "fwd+bwd (jax.grad)" if grad else "fwd",
      "compile_s": seconds,
      "flops": float(cost.get("flops", float("nan"))),
      "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "memory": {k: int(getattr(mem, k)) for k in mem_fields if hasattr(mem, k)},
  }


def compiled_comparison(jobs) -> dict:
  """Compiles each (generation, shape, seq, grad) job; model vs compiled."""
  reason = libtpu_available()
  if reason is not None:
    msg = f"skipped: libtpu is not available ({reason}); install the `tpu` extra"
    print(msg)
    return {"skipped": msg, "rows": []}
  rows = []
  for generation, shape, seq, grad in jobs:
    gen = GENERATIONS[generation]
    try:
      got = compile_for(generation, shape, seq, grad=grad)
    except Exception as e:  # noqa: BLE001 - record and go on
      rows.append({"generation": generation, "shape": shape.name, "seq": seq,
                   "kind": "fwd+bwd (jax.grad)" if grad else "fwd",
                   "error": f"{type(e).__name__}: {str(e)[:500]}"})
      print(f"  {generation} {shape.name} T={seq} grad={grad}: FAILED {type(e).__name__}")
      continue
    model = polysketch_forward_cost(shape, seq, gen)
    if grad:
      model = model + polysketch_backward_cost(shape, seq, gen)
    got["model_flops"] = model.flops
    got["model_bytes"] = model.bytes
    got["flops_ratio"] = got["flops"] / model.flops
    got["bytes_ratio"] = got["bytes_accessed"] / model.bytes
    # The roofline again, from the compiler's own counts (its bytes reflect the
    # TPU device layouts XLA chose, which can turn transposes into bitcasts).
    got["compiled_projection"] = project(
        Cost(got["flops"], got["bytes_accessed"], {}), gen)
    flash = flash_forward_cost(shape, seq)
    if grad:
      flash = flash + flash_backward_cost(shape, seq)
    got["compiled_speedup_vs_flash"] = (project(flash, gen)["time_tc_s"]
                                        / got["compiled_projection"]["time_tc_s"])
    rows.append(got)
    print(f"  {generation:4s} {shape.name:13s} T={_k(seq):5s} {got['kind']:18s} "
          f"flops model {model.flops:.4g} compiled {got['flops']:.4g} "
          f"(x{got['flops_ratio']:.3f}); bytes model {model.bytes:.4g} compiled "
          f"{got['bytes_accessed']:.4g} (x{got['bytes_ratio']:.3f}) -> "
          f"{got['compiled_projection']['bound']}-bound, "
          f"x{got['compiled_speedup_vs_flash']:.1f} vs flash; "
          f"temp {got['memory'].get('temp_size_in_bytes', 0) / 2**20:.1f} MiB "
          f"[{got['compile_s']:.0f} s]")
  return {"skipped": None, "rows": rows}


def default_compile_jobs(generations=DEFAULT_GENERATIONS, *, seq=32768, extra_seq=4096):
  jobs = []
  for g in generations:
    for grad in (False, True):
      jobs.append((g, GPT2, seq, grad))
  # Linearity check of the compiled counts on v5e, and the wide head shape.
  for grad in (False, True):
    jobs.append(("v5e", GPT2, extra_seq, grad))
    jobs.append(("v5e", WIDE, seq, grad))
  return jobs


# --------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--generations", nargs="+", default=list(DEFAULT_GENERATIONS),
                  choices=sorted(GENERATIONS))
  ap.add_argument("--seqs", nargs="+", type=int, default=list(DEFAULT_SEQS))
  ap.add_argument("--flash-block", type=int, default=512,
                  help="FlashAttention q/k block (K, V re-read once per q block)")
  ap.add_argument("--no-compile", action="store_true",
                  help="skip the libtpu compile comparison")
  ap.add_argument("--compile-seq", type=int, default=32768)
  ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
  ap.add_argument("--no-plot", action="store_true")
  args = ap.parse_args(argv)

  rows = build_model(SHAPES, args.seqs, args.generations, block_q=args.flash_block)
  for shape in SHAPES:
    for g in args.generations:
      print(format_table(rows, g, shape.name))
      print()
  tg = targets(rows, seq=32768) if 32768 in args.seqs else {}
  if tg:
    print("Targets at T=32k, GPT-2 head shape (H=64, r=32, b=256, bf16):")
    for g, t in tg.items():
      print(f"  {g:4s} fwd {t['speedup_fwd']:.1f}x (>= 8x: {t['fwd_ge_8x']}), "
            f"fwd {t['fwd_bound']}-bound (AI {t['fwd_intensity']:.0f} vs ridge "
            f"{t['ridge']:.0f}); with the old layout's transposes "
            f"{t['speedup_fwd_old_layout']:.1f}x, {t['fwd_old_layout_bound']}-bound "
            f"(AI {t['fwd_old_layout_intensity']:.0f}); "
            f"fwd+bwd {t['speedup_fwdbwd']:.1f}x (>= 6x: {t['fwdbwd_ge_6x']})")
  args.out_dir.mkdir(parents=True, exist_ok=True)
  hardware = {g: dataclasses.asdict(GENERATIONS[g]) | {
      "peak_bf16_flops_per_tc": GENERATIONS[g].peak_bf16_flops,
      "hbm_bytes_per_s_per_tc": GENERATIONS[g].hbm_bytes_per_s,
      "ridge_flops_per_byte": ridge_point(GENERATIONS[g])} for g in args.generations}
  out = {"shapes": [dataclasses.asdict(s) for s in SHAPES], "flash_block": args.flash_block,
         "hardware": hardware, "rows": rows, "targets_32k_gpt2": tg}
  (args.out_dir / "roofline.json").write_text(json.dumps(out, indent=1))
  print(f"wrote {args.out_dir / 'roofline.json'}")
  if not args.no_plot:
    print(f"wrote {plot(rows, args.out_dir / 'roofline.png', generations=args.generations)}")
  if not args.no_compile:
    print("Compiled cost analysis (libtpu, CPU host):")
    comp = compiled_comparison(default_compile_jobs(args.generations, seq=args.compile_seq))
    (args.out_dir / "roofline_compiled.json").write_text(json.dumps(comp, indent=1))
    print(f"wrote {args.out_dir / 'roofline_compiled.json'}")
  else:
    comp = None
  (args.out_dir / "roofline.md").write_text(markdown_report(rows, tg, comp))
  print(f"wrote {args.out_dir / 'roofline.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
