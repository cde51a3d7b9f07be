"""Decoding with PolySketch's constant-size state against a softmax KV cache.

For each attention shape and each context length L, one process measures:

  polysketch  `jax.jit(decode_step)` on a `DecodeState` after L tokens: the
              per-token latency and the state's bytes per sequence
              (`DecodeState.nbytes() / batch`, constant in L)
  softmax     one new token's attention over a KV cache of length L,
              `jax.nn.dot_product_attention` with q [B, 1, N, H] and k, v
              [B, L, K, H]; the cache's bytes per sequence (2 L K H itemsize,
              taken from the arrays)
  softmax_head_major
              the same with a head-major cache [B, K, L, H] and two einsums
              (grouped queries, float32 softmax). On XLA:CPU this is many times
              faster than dot_product_attention on [B, L, K, H] (whose layout
              costs a relayout of the cache per call), so it is the fair
              baseline there; both are recorded.

Appending the new token's k, v to the cache is not timed: in place it costs
O(K H), but XLA:CPU copies the whole cache for a dynamic-update-slice even
with donated buffers, which would charge softmax O(L) for it. Leaving it out
favours softmax. (PolySketch's `decode_step` does include its state update,
and XLA:CPU copies its state too: a cost constant in L.)

and, per shape, the prefill throughput (tokens/s of `prefill`,
implementation="xla") at a few lengths.

The PolySketch state after L tokens. A decode step's work does not depend on
the state's values, only on its shapes, which are the same for every L, and on
whether the step completes a block. By default (--state standin) the state is
`init_decode_state` with fill = L mod block and random entries (S, z and the
tail; the values are not those of any real prefix, the shapes and the branch
taken are). --state prefill builds it with `prefill` on L random LayerNorm'd
tokens instead (slow on CPU for long contexts). As a check, at every prefill
length the decode step is also timed from the state that prefill returned.

A decode step at fill < block-1 appends to the tail; at fill = block-1 it also
folds the block into (S, z). Both are timed (`step` at fill = L mod block, or 0
if that is block-1; `fold` at fill = block-1) and the per-token latency reported
and plotted is their average over a block, ((block-1) step + fold) / block. The
state is donated and threaded through the timed calls, as in a real decode loop
(only fill is reset between calls). Timings exclude compilation (reported) and a warm-up call; each
call ends in `block_until_ready`; figures are medians.

From the measured data the script reports the context length from which the
PolySketch state is smaller than the KV cache (the exact break-even and the
first measured context) and whether PolySketch's latency stays flat (max/min
over the contexts within --flat-tol) while the KV cache's grows (log-log slope).
Writes bench/results/decode-<tag>.json, .md (tables) and .png (latency and
bytes per sequence vs context).

  JAX_PLATFORMS=cpu python bench/decode.py                          # full run
  JAX_PLATFORMS=cpu python bench/decode.py --contexts 1024 2048 4096 8192
  JAX_PLATFORMS=cpu python bench/decode.py --shapes gpt2 gqa --sketch-dim 16
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_polysketch as ps

DEFAULT_CONTEXTS = tuple(1024 * 2 ** i for i in range(8))     # 1k .. 128k
DEFAULT_PREFILL = (1024, 4096, 16384)


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  heads: int
  kv_heads: int
  head_dim: int
  sketch_dim: int
  block_size: int


PRESETS = {
    "gpt2": Shape("gpt2", heads=12, kv_heads=12, head_dim=64, sketch_dim=32, block_size=256),
    "gqa": Shape("gqa", heads=32, kv_heads=8, head_dim=128, sketch_dim=32, block_size=256),
}


def parse_shape(spec: str) -> Shape:
  """A preset name, or NAME:HEADS:KV_HEADS:HEAD_DIM:SKETCH_DIM:BLOCK."""
  if spec in PRESETS:
    return PRESETS[spec]
  parts = spec.split(":")
  if len(parts) != 6:
    raise argparse.ArgumentTypeError(
        f"shape {spec!r}: a preset ({', '.join(PRESETS)}) or "
        "NAME:HEADS:KV_HEADS:HEAD_DIM:SKETCH_DIM:BLOCK")
  try:
    n, kv, h, r, b = (int(x) for x in parts[1:])
  except ValueError:
    raise argparse.ArgumentTypeError(f"shape {spec!r}: the sizes must be integers") from None
  if n % kv:
    raise argparse.ArgumentTypeError(f"shape {spec!r}: heads {n} not a multiple of kv heads {kv}")
  return Shape(parts[0], n, kv, h, r, b)


# ----------------------------------------------------------------------------
# Inputs and states.
# ----------------------------------------------------------------------------

def make_inputs(seq, shape, batch, dtype, degree, seed=0):
  """LayerNorm-scaled q [B, seq, N, H], k [B, seq, K, H], v, and random-sketch features.

  q, k, v come from numpy (no compilation per length); the features from the
  package's random sketch."""
  rng = np.random.default_rng(seed)
  h = shape.head_dim
  layer_norm = lambda x: (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
  normal = lambda heads: rng.standard_normal((batch, seq, heads, h), np.float32)
  q = jnp.asarray(layer_norm(normal(shape.heads)) / h ** 0.25)
  k = jnp.asarray(layer_norm(normal(shape.kv_heads)) / h ** 0.25)
  v = jnp.asarray(normal(shape.kv_heads))
  sketch = ps.random_sketch_init(jax.random.key(seed), h, shape.sketch_dim, degree)
  features = jax.jit(ps.random_sketch_features)
  fq, fk = features(sketch, q), features(sketch, k)
  return tuple(jax.block_until_ready(x.astype(dtype)) for x in (q, k, v, fq, fk))


def standin_state(context, shape, batch, dtype, degree, seed=1):
  """`init_decode_state` with fill = context mod block and random entries
  (numpy; the tail's slots from fill on stay 0, as in a real state)."""
  state = ps.init_decode_state(batch, shape.kv_heads, shape.head_dim, shape.sketch_dim,
                               degree=degree, block_size=shape.block_size, dtype=dtype)
  fill = context % shape.block_size
  rng = np.random.default_rng(seed)
  slot = np.arange(shape.block_size)[None, :, None, None]
  rand = lambda x: rng.standard_normal(x.shape, np.float32)
  put = lambda x, y: jnp.asarray(y).astype(x.dtype)
  tail = lambda x: put(x, np.where(slot < fill, rand(x), np.float32(0)))
  state = dataclasses.replace(
      state, prefix_state=put(state.prefix_state, rand(state.prefix_state)),
      normalizer=put(state.normalizer, np.abs(rand(state.normalizer))),
      tail_k=tail(state.tail_k), tail_v=tail(state.tail_v),
      tail_k_features=tail(state.tail_k_features),
      fill=jnp.asarray(np.full((batch,), fill, np.int32)))
  return jax.block_until_ready(state)


def prefill_fn(shape, degree):
  return jax.jit(functools.partial(ps.prefill, degree=degree, block_size=shape.block_size,
                                   implementation="xla"))


def prefilled_state(context, shape, batch, dtype, degree):
  inputs = make_inputs(context, shape, batch, dtype, degree, seed=2)
  _, state = prefill_fn(shape, degree)(*inputs)
  return jax.block_until_ready(state)


def with_fill(state, fill):
  return dataclasses.replace(state, fill=jnp.asarray(np.full((state.batch,), fill, np.int32)))


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------

def timed_loop(step, carry, *, min_reps, max_reps, min_time, max_time, prepare=lambda c: c):
  """Warm-up call, then repeated calls threading `carry` (which `step` may donate).

  At least min_reps calls and min_time seconds, at most max_reps calls, and
  past max_time seconds stop once 3 calls ran (slow softmax steps at long
  contexts). step(carry) -> (out, carry); prepare(carry) runs untimed before
  each call.
  Returns (times in s, the warm-up's duration, the final carry)."""
  carry = prepare(carry)
  t0 = time.perf_counter()
  out, carry = step(carry)
  jax.block_until_ready((out, carry))
  warmup = time.perf_counter() - t0
  times = []
  start = time.perf_counter()
  while len(times) < max_reps:
    elapsed = time.perf_counter() - start
    enough = len(times) >= min_reps and elapsed >= min_time
    if enough or (len(times) >= 3 and elapsed >= max_time):
      break
    carry = jax.block_until_ready(prepare(carry))
    t0 = time.perf_counter()
    out, carry = step(carry)
    jax.block_until_ready((out, carry))
    times.append(time.perf_counter() - t0)
  return times, warmup, carry


_STEP_CACHE = {}


def compiled_decode_step(state, token):
  """`jax.jit(decode_step)` with the state donated, compiled once per shapes.

  The state's shapes do not depend on the context, so every context of a shape
  runs the same executable. Returns (compiled, seconds spent compiling now)."""
  key = (jax.tree.structure(state),
         tuple((x.shape, x.dtype) for x in jax.tree.leaves((state, token))))
  if key in _STEP_CACHE:
    return _STEP_CACHE[key], 0.0
  t0 = time.perf_counter()
  compiled = jax.jit(ps.decode_step, donate_argnums=0).lower(state, *token).compile()
  _STEP_CACHE[key] = compiled
  return compiled, time.perf_counter() - t0


def measure_polysketch(state, token, opts, *, fills=None):
  """Times decode_step at a non-folding fill and at fill = block-1 (the fold).

  Returns a dict of timings; `state` is consumed (donated)."""
  b = state.block_size
  compiled, compile_s = compiled_decode_step(state, token)
  step = lambda st: compiled(st, *token)
  if fills is None:
    fill = int(np.asarray(state.fill)[0])
    fills = {"step": fill if fill != b - 1 else 0, "fold": b - 1}
  rec = {"compile_s": compile_s, "fills": fills}
  for kind, fill in fills.items():
    times, warmup, state = timed_loop(
        step, state, min_reps=opts.min_reps, max_reps=opts.max_reps, min_time=opts.min_time,
        max_time=opts.max_time,
        prepare=lambda st, f=fill: with_fill(st, f))
    rec[f"{kind}_times_s"] = times
    rec[f"{kind}_s"] = statistics.median(times)
    rec[f"{kind}_warmup_s"] = warmup
  rec["latency_s"] = ((b - 1) * rec["step_s"] + rec["fold_s"]) / b
  return rec


def softmax_step(q, cache_k, cache_v):
  """Token-major cache [B, L, K, H]: `jax.nn.dot_product_attention`."""
  return jax.nn.dot_product_attention(q, cache_k, cache_v)


def softmax_head_major_step(q, cache_k, cache_v):
  """Head-major cache [B, K, L, H]: the same attention as two einsums over
  contiguous [L, H] slabs per kv head (float32 scores and softmax)."""
  batch, _, n, h = q.shape
  kv = cache_k.shape[1]
  qg = q.reshape(batch, kv, n // kv, h)
  s = jnp.einsum("bkgh,bklh->bkgl", qg, cache_k, preferred_element_type=jnp.float32)
  p = jax.nn.softmax(s * h ** -0.5, axis=-1)
  out = jnp.einsum("bkgl,bklh->bkgh", p.astype(cache_v.dtype), cache_v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, 1, n, h).astype(q.dtype)


SOFTMAX = {
    # name: (step, cache layout, label)
    "softmax": (softmax_step, "BLKH", "softmax, jax.nn.dot_product_attention, [B,L,K,H] cache"),
    "softmax_head_major": (softmax_head_major_step, "BKLH",
                           "softmax, einsum, head-major [B,K,L,H] cache"),
}


def measure_softmax(name, context, shape, batch, dtype, token, opts):
  step_fn, layout, _ = SOFTMAX[name]
  rng = np.random.default_rng(3)
  dims = {"B": batch, "L": context, "K": shape.kv_heads, "H": shape.head_dim}
  cache_shape = tuple(dims[c] for c in layout)
  cache = tuple(jnp.asarray(rng.standard_normal(cache_shape, np.float32)).astype(dtype)
                for _ in range(2))
  cache = jax.block_until_ready(cache)
  kv_bytes = sum(c.nbytes for c in cache) // batch
  q = token[0]
  t0 = time.perf_counter()
  compiled = jax.jit(step_fn).lower(q, *cache).compile()
  compile_s = time.perf_counter() - t0
  times, warmup, _ = timed_loop(lambda c: (compiled(q, *c), c), cache, min_reps=opts.min_reps,
                                max_reps=opts.max_reps, min_time=opts.min_time,
                                max_time=opts.max_time)
  del cache
  return {"compile_s": compile_s, "times_s": times, "latency_s": statistics.median(times),
          "warmup_s": warmup, "kv_bytes_per_seq": kv_bytes, "layout": layout}


def measure_prefill(seq, shape, batch, dtype, degree, token, opts):
  inputs = make_inputs(seq, shape, batch, dtype, degree, seed=2)
  fn = prefill_fn(shape, degree)
  t0 = time.perf_counter()
  compiled = fn.lower(*inputs).compile()
  compile_s = time.perf_counter() - t0
  run = functools.partial(compiled, *inputs)
  t0 = time.perf_counter()
  _, state = jax.block_until_ready(run())
  warmup = time.perf_counter() - t0
  reps = opts.prefill_reps if warmup < opts.long_call_s else min(opts.prefill_reps, 2)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  rec = {"seq": seq, "compile_s": compile_s, "warmup_s": warmup, "times_s": times,
         "median_s": med, "tokens_per_s": batch * seq / med,
         "state_bytes_per_seq": state.nbytes() // batch}
  del inputs, run
  # The stand-in check: decode from the state prefill returned vs the stand-in.
  fill = int(np.asarray(state.fill)[0])
  fills = {"step": fill if fill != shape.block_size - 1 else 0, "fold": shape.block_size - 1}
  rec["decode_from_prefill"] = measure_polysketch(state, token, opts, fills=fills)
  rec["decode_from_standin"] = measure_polysketch(
      standin_state(seq, shape, batch, dtype, degree), token, opts, fills=fills)
  return rec


# ----------------------------------------------------------------------------
# Analysis.
# ----------------------------------------------------------------------------

def loglog_slope(xs, ys):
  """Least-squares slope of log y against log x (0: flat, 1: linear)."""
  if len(xs) < 2:
    return None
  lx, ly = np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float))
  return float(np.polyfit(lx, ly, 1)[0])


def _first_from(contexts, flags):
  """The first context from which flags hold for it and every larger one."""
  for i, c in enumerate(contexts):
    if all(flags[i:]):
      return c
  return None


def analyse(rows, opts):
  """Crossover and flatness, computed from the measured rows of one shape.

  The KV-cache bytes are the first softmax variant's (all variants store the
  same numbers, in different layouts)."""
  rows = sorted(rows, key=lambda r: r["context"])
  ctx = [r["context"] for r in rows]
  variants = [v for v in SOFTMAX if v in rows[0]]
  kv_bytes = [r[variants[0]]["kv_bytes_per_seq"] for r in rows]
  state = [r["polysketch"]["state_bytes_per_seq"] for r in rows]
  kv_per_token = sorted({kb / c for kb, c in zip(kv_bytes, ctx)})
  sb, kvt = max(state), kv_per_token[-1]
  out = {"state_bytes_constant": len(set(state)) == 1,
         "kv_bytes_linear": len(kv_per_token) == 1,
         "state_bytes_per_seq": sb, "kv_bytes_per_token": kvt,
         # The smallest context whose cache is larger than the state.
         "break_even_context": math.floor(sb / kvt) + 1,
         "state_smaller_from_context": _first_from(ctx, [s < k for s, k in zip(state, kv_bytes)]),
         "kv_over_state_at_max_context": kv_bytes[-1] / sb,
         "flat_tol": opts.flat_tol}
  ps_lat = [r["polysketch"]["latency_s"] for r in rows]
  ratio = max(ps_lat) / min(ps_lat)
  out["polysketch"] = {"latency_max_over_min": ratio, "latency_slope": loglog_slope(ctx, ps_lat),
                       "flat": len(rows) > 1 and ratio <= opts.flat_tol}
  for v in variants:
    lat = [r[v]["latency_s"] for r in rows]
    growth, slope = lat[-1] / lat[0], loglog_slope(ctx, lat)
    faster = [p < m for p, m in zip(ps_lat, lat)]
    out[v] = {"latency_last_over_first": growth, "latency_slope": slope,
              "grows": len(rows) > 1 and growth > opts.flat_tol and slope > 0.5,
              "polysketch_faster_from_context": _first_from(ctx, faster),
              "speedup_at_max_context": lat[-1] / ps_lat[-1]}
  return out


def summary_lines(shape_name, a):
  fmt_ctx = lambda c: "none of the measured" if c is None else f"{c:,}"
  p = a["polysketch"]
  lines = [
      f"{shape_name}: the PolySketch state ({a['state_bytes_per_seq']:,} B per sequence, "
      f"{'constant' if a['state_bytes_constant'] else 'NOT constant'} over the contexts) is "
      f"smaller than the KV cache ({a['kv_bytes_per_token']:,.0f} B per token, "
      f"{'linear' if a['kv_bytes_linear'] else 'NOT linear'} in the context) from context "
      f"{a['break_even_context']:,} on (first measured: "
      f"{fmt_ctx(a['state_smaller_from_context'])}); "
      f"at the longest context the cache is {a['kv_over_state_at_max_context']:.1f}x the state.",
      f"{shape_name}: PolySketch latency {'stays flat' if p['flat'] else 'does NOT stay flat'} "
      f"(max/min {p['latency_max_over_min']:.2f}x, tolerance {a['flat_tol']:g}x; "
      f"log-log slope {_num(p['latency_slope'])})."]
  for v in SOFTMAX:
    if v in a:
      m = a[v]
      lines.append(
          f"{shape_name}: {SOFTMAX[v][2]}: latency "
          f"{'grows' if m['grows'] else 'does NOT grow clearly'} (last/first "
          f"{m['latency_last_over_first']:.2f}x, log-log slope {_num(m['latency_slope'])}); "
          f"PolySketch is faster from context {fmt_ctx(m['polysketch_faster_from_context'])} "
          f"({m['speedup_at_max_context']:.2f}x at the longest).")
  return lines


def _num(x, f="{:.2f}"):
  return "-" if x is None else f.format(x)


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------

def _ms(s):
  return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def _bytes(n):
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def format_markdown(report):
  meta = report["meta"]
  out = [f"# Decode: PolySketch state vs softmax KV cache ({meta['tag']})", "",
         f"`{meta['command']}`", "",
         f"{meta['backend']} ({meta['cpu_model']}, {meta['cpu_count']} cpus), jax {meta['jax']}, "
         f"{meta['dtype']}, batch {meta['batch']}, degree {meta['degree']}; state: "
         f"{meta['state_source']}; load average {_load(meta.get('loadavg_start'))} at the start, "
         f"{_load(meta.get('loadavg_end'))} at the end. Latency in ms per token "
         "(PolySketch: ((b-1) step + fold) / b; step and fold beside it), bytes per sequence.", ""]
  for sh in report["shapes"]:
    s = sh["shape"]
    out.append(f"## {s['name']}: {s['heads']} heads / {s['kv_heads']} kv heads, head_dim "
               f"{s['head_dim']}, sketch_dim {s['sketch_dim']}, block {s['block_size']}")
    out.append("")
    variants = [v for v in SOFTMAX if v in sh["decode"][0]]
    head = "| context | PolySketch ms | step ms | fold ms |"
    for v in variants:
      head += f" {v} ms | {v}/PolySketch |"
    out.append(head + " state bytes | KV bytes | KV/state | load |")
    out.append("|" + "---:|" * (head.count("|") - 1 + 4))
    for r in sh["decode"]:
      p, kvb = r["polysketch"], r[variants[0]]["kv_bytes_per_seq"]
      row = (f"| {r['context']:,} | {_ms(p['latency_s'])} | {_ms(p['step_s'])} "
             f"| {_ms(p['fold_s'])} |")
      for v in variants:
        row += f" {_ms(r[v]['latency_s'])} | {r[v]['latency_s'] / p['latency_s']:.2f}x |"
      out.append(row + f" {_bytes(p['state_bytes_per_seq'])} | {_bytes(kvb)} "
                 f"| {kvb / p['state_bytes_per_seq']:.2f}x | {r['loadavg'][0]:.1f} |")
    out.append("")
    out.extend(f"- {line}" for line in summary_lines(s["name"], sh["analysis"]))
    if sh["prefill"]:
      out += ["", "Prefill (`prefill`, xla) and, as a check of the stand-in state, the decode "
              "step from the state prefill returned:", "",
              "| seq | prefill s | tokens/s | decode ms (prefilled state) | decode ms (stand-in) |",
              "|---:|---:|---:|---:|---:|"]
      for r in sh["prefill"]:
        out.append(f"| {r['seq']:,} | {r['median_s']:.4g} | {r['tokens_per_s']:,.0f} "
                   f"| {_ms(r['decode_from_prefill']['latency_s'])} "
                   f"| {_ms(r['decode_from_standin']['latency_s'])} |")
    out.append("")
  return "\n".join(out)


def _load(x):
  return "-" if not x else "/".join(f"{v:.1f}" for v in x)


def plot(report, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(13, 4.8))
  for i, sh in enumerate(report["shapes"]):
    name, color, rows = sh["shape"]["name"], f"C{i}", sh["decode"]
    ctx = [r["context"] for r in rows]
    ax_t.plot(ctx, [r["polysketch"]["latency_s"] * 1e3 for r in rows], "o-", color=color,
              label=f"{name}: PolySketch")
    ax_t.plot(ctx, [r["polysketch"]["fold_s"] * 1e3 for r in rows], "x", color=color, alpha=0.5,
              label=f"{name}: PolySketch fold step (1 per block)")
    for v, style in zip([v for v in SOFTMAX if v in rows[0]], ("s--", "^:")):
      ax_t.plot(ctx, [r[v]["latency_s"] * 1e3 for r in rows], style, color=color,
                label=f"{name}: {v} ({SOFTMAX[v][1]})")
    ax_b.plot(ctx, [r["polysketch"]["state_bytes_per_seq"] / 2 ** 20 for r in rows], "o-",
              color=color, label=f"{name}: PolySketch state")
    kv = next(v for v in SOFTMAX if v in rows[0])
    ax_b.plot(ctx, [r[kv]["kv_bytes_per_seq"] / 2 ** 20 for r in rows], "s--",
              color=color, label=f"{name}: KV cache")
    ax_b.axvline(sh["analysis"]["break_even_context"], color=color, lw=0.8, ls=":")
  ax_t.set_ylabel("ms per token (PolySketch: average over a block)")
  ax_t.set_title("decode latency")
  ax_b.set_ylabel("MiB per sequence")
  ax_b.set_title("state / cache bytes (dotted: break-even)")
  for ax in (ax_t, ax_b):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  meta = report["meta"]
  fig.suptitle(f"{meta['backend']} ({meta['cpu_count']} cpus), {meta['dtype']}, batch "
               f"{meta['batch']}, load {_load(meta.get('loadavg_start'))} -> "
               f"{_load(meta.get('loadavg_end'))}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info():
  """bench/attention.py's machine record, plus the CPU model."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import attention as attention_bench  # noqa: E402  (bench/attention.py)
  info = attention_bench.machine_info()
  info["cpu_model"] = cpu_model()
  return info


def loadavg():
  try:
    return list(os.getloadavg())
  except OSError:
    return None


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS),
                 help="context lengths (default 1k, 2k, ..., 128k)")
  p.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                 help="presets gpt2 (12/12 heads, H 64, r 32, b 256), gqa (32/8 heads, H 128, "
                      "r 32, b 256), or NAME:HEADS:KV_HEADS:HEAD_DIM:SKETCH_DIM:BLOCK "
                      "(default gpt2 gqa)")
  p.add_argument("--sketch-dim", type=int, default=None,
                 help="override every shape's sketch_dim (a smaller state)")
  p.add_argument("--head-dim", type=int, default=None,
                 help="override every shape's head_dim (a narrower head)")
  p.add_argument("--prefill-seqs", type=int, nargs="*", default=list(DEFAULT_PREFILL),
                 help="prefill lengths (none: skip prefill)")
  p.add_argument("--state", dest="state_source", choices=("standin", "prefill"),
                 default="standin", help="how the state after L tokens is built (see above)")
  p.add_argument("--softmax", nargs="+", choices=tuple(SOFTMAX), default=list(SOFTMAX),
                 help="KV-cache baselines (default both)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="of q, k, v, the KV cache and the state's tail (S, z are float32)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--degree", type=int, default=4)
  p.add_argument("--min-reps", type=int, default=20)
  p.add_argument("--max-reps", type=int, default=200)
  p.add_argument("--min-time", type=float, default=1.0,
                 help="keep timing decode steps (up to --max-reps) for this many seconds")
  p.add_argument("--max-time", type=float, default=20.0,
                 help="past this many seconds, stop timing a step once 3 calls ran")
  p.add_argument("--prefill-reps", type=int, default=3)
  p.add_argument("--long-call-s", type=float, default=15.0,
                 help="a prefill whose warm-up took longer gets at most 2 timed runs")
  p.add_argument("--flat-tol", type=float, default=1.5,
                 help="latency 'flat' if max/min over the contexts is within this factor")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results"))
  p.add_argument("--tag", default=None, help="files decode-TAG.* (default BACKEND-DTYPE)")
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  shapes = args.shapes or [PRESETS["gpt2"], PRESETS["gqa"]]
  if args.sketch_dim is not None:
    shapes = [dataclasses.replace(s, sketch_dim=args.sketch_dim) for s in shapes]
  if args.head_dim is not None:
    shapes = [dataclasses.replace(s, head_dim=args.head_dim) for s in shapes]
  args.shapes = shapes
  args.contexts = sorted(set(args.contexts))
  args.softmax = [v for v in SOFTMAX if v in args.softmax]
  args.prefill_seqs = sorted(set(args.prefill_seqs))
  return args


def run_shape(shape, opts, dtype, log):
  b = shape.block_size
  token = make_inputs(1, shape, opts.batch, dtype, opts.degree, seed=4)
  rows = []
  for ctx in opts.contexts:
    load = loadavg()
    if opts.state_source == "prefill":
      state = prefilled_state(ctx, shape, opts.batch, dtype, opts.degree)
    else:
      state = standin_state(ctx, shape, opts.batch, dtype, opts.degree)
    state_bytes = state.nbytes() // opts.batch
    p = measure_polysketch(state, token, opts)
    p["state_bytes_per_seq"] = state_bytes
    row = {"context": ctx, "fill": ctx % b, "loadavg": load, "polysketch": p}
    for v in opts.softmax:
      row[v] = measure_softmax(v, ctx, shape, opts.batch, dtype, token, opts)
    rows.append(row)
    log(f"  {shape.name:6} ctx {ctx:7}: PolySketch {_ms(p['latency_s']):>7} ms "
        f"(step {_ms(p['step_s'])}, fold {_ms(p['fold_s'])}), {_bytes(state_bytes)} | "
        + " | ".join(f"{v} {_ms(row[v]['latency_s']):>7} ms" for v in opts.softmax)
        + f", {_bytes(row[opts.softmax[0]]['kv_bytes_per_seq'])} | "
        f"load {load[0] if load else float('nan'):.1f}")
  prefill = []
  for seq in opts.prefill_seqs:
    r = measure_prefill(seq, shape, opts.batch, dtype, opts.degree, token, opts)
    r["loadavg"] = loadavg()
    prefill.append(r)
    log(f"  {shape.name:6} prefill {seq:7}: {r['median_s']:.4g} s, {r['tokens_per_s']:,.0f} tok/s; "
        f"decode from it {_ms(r['decode_from_prefill']['latency_s'])} ms, stand-in "
        f"{_ms(r['decode_from_standin']['latency_s'])} ms")
  return {"shape": dataclasses.asdict(shape), "decode": rows, "prefill": prefill,
          "analysis": analyse(rows, opts)}


def main(argv=None):
  opts = parse_args(argv)
  dtype = jnp.dtype(opts.dtype)
  meta = machine_info()
  tag = opts.tag or f"{meta['backend']}-{opts.dtype}"
  meta.update(
      tag=tag, dtype=opts.dtype, batch=opts.batch, degree=opts.degree,
      state_source=("init_decode_state stand-in (fill = context mod block, random entries)"
                    if opts.state_source == "standin" else "prefill of the context"),
      softmax={v: SOFTMAX[v][2] + "; attention only, the cache append is not timed"
               for v in opts.softmax},
      command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
      else "bench/decode.py " + " ".join(shlex.quote(a) for a in argv),
      args={k: v for k, v in vars(opts).items() if k != "shapes"},
      jax_platforms_env=os.environ.get("JAX_PLATFORMS"),
      loadavg_start=loadavg(), started=datetime.datetime.now().isoformat(timespec="seconds"))
  t_start = time.perf_counter()
  log = lambda s: print(s, flush=True)
  log(f"# decode bench {tag}: {meta['backend']} ({meta['cpu_model']}, {meta['cpu_count']} cpus), "
      f"jax {meta['jax']}, {opts.dtype}, batch {opts.batch}, state {opts.state_source}, "
      f"load {_load(meta['loadavg_start'])}")
  shapes = []
  for shape in opts.shapes:
    log(f"# {shape}")
    shapes.append(run_shape(shape, opts, dtype, log))
  meta["loadavg_end"] = loadavg()
  meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  meta["wall_s"] = time.perf_counter() - t_start
  report = {"meta": meta, "shapes": shapes}
  os.makedirs(opts.out_dir, exist_ok=True)
  stem = os.path.join(opts.out_dir, f"decode-{tag}")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=1)
  md = format_markdown(report)
  with open(stem + ".md", "w") as f:
    f.write(md + "\n")
  log(md)
  log(f"wrote {stem}.json, {stem}.md")
  if not opts.no_plot:
    plot(report, stem + ".png")
    log(f"wrote {stem}.png")
  return report


if __name__ == "__main__":
  main()
