"""Speed and memory of PolySketch attention against softmax, side by side.

One process times, at each sequence length and dtype, forward and
forward+backward of:

  polysketch  `polysketch_attention(..., implementation="xla")` (the package)
  plain       (with --baseline-plain) a plain blocked-einsum DESIGN §1.3 that
              materialises phi = f (x) f, nothing tuned
  einsum      (with --baseline-einsum) the official einsum form: the
              three-operand einsums of the google-research PolySketchFormer
              code (f_k, f_k, [v, 1] -> block states; cumsum over blocks;
              f_q, f_q, S -> reads) plus the exact local blocks, autodiff
              backward: the bar the package's xla path must clear
  softmax     `jax.nn.dot_product_attention` (XLA; cuDNN on a GPU backend)
  polynomial  exact `polynomial_attention`, O(T^2)

Each configuration is compiled first; its memory comes from the compiled
`memory_analysis()` (temp + argument + output bytes) and a configuration
predicted above --budget-gib is recorded as out of memory and not run. Timings
exclude compilation (reported separately) and a warm-up call, and are medians
of repeated runs ending in `block_until_ready`. Writes a JSON and a plot under
bench/results/ and prints a table.

  JAX_PLATFORMS=cpu python bench/attention.py                    # full run
  JAX_PLATFORMS=cpu python bench/attention.py --quick            # 1k-4k, f32
  JAX_PLATFORMS=cpu python bench/attention.py --baseline-plain   # + plain
  JAX_PLATFORMS=cpu python bench/attention.py --baseline-einsum  # + einsum form
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import pallas_polysketch as ps
from pallas_polysketch.sketches import self_tensor

GIB = 2 ** 30
DEFAULT_SEQS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
MODES = ("fwd", "fwd+bwd")
METHOD_LABELS = {
    "polysketch": "PolySketch (xla)",
    "plain": "plain blocked einsum",
    "einsum": "official einsum form",
    "softmax": "softmax",
    "polynomial": "exact polynomial",
}


# ----------------------------------------------------------------------------
# The plain baseline: DESIGN §1.3 as per-block einsums, nothing tuned.
# ----------------------------------------------------------------------------

def plain_blocked_attention(q, k, v, q_features, k_features, *, degree=4,
                            block_size=256):
  """Causal PolySketch attention (local_exact) as plain blocked einsums.

  phi = f (x) f for every block at once, block updates U_t = Phi_k_t^T V_t,
  exclusive cumsum over blocks for S_t and z_t, reads Phi_q_t S_t and the exact
  local block by einsum; autodiff for the backward. seq must be a multiple
  of block_size. Computes in float32.
  """
  out_dtype = q.dtype
  q, k, v, fq, fk = (x.astype(jnp.float32) for x in (q, k, v, q_features, k_features))
  b_, t, n, h = q.shape
  if t % block_size:
    raise ValueError(f"seq {t} must be a multiple of block_size {block_size}")
  nb = t // block_size
  qb, kb, vb, fqb, fkb = (x.reshape(b_, nb, block_size, n, x.shape[-1])
                          for x in (q, k, v, fq, fk))
  phi_q, phi_k = self_tensor(fqb), self_tensor(fkb)          # [B, nb, b, N, r^2]
  upd = jnp.einsum("btjnc,btjnh->btnch", phi_k, vb)          # U_t
  upd_z = jnp.sum(phi_k, axis=2)                             # [B, nb, N, r^2]
  excl = lambda x: jnp.cumsum(x, axis=1) - x                 # sum over s < t
  state, norm = excl(upd), excl(upd_z)
  local = jnp.einsum("btinh,btjnh->btnij", qb, kb) ** degree
  local = jnp.where(jnp.tril(jnp.ones((block_size, block_size), bool)), local, 0.0)
  num = (jnp.einsum("btnij,btjnh->btinh", local, vb)
         + jnp.einsum("btinc,btnch->btinh", phi_q, state))
  den = (1.0 + jnp.einsum("btnij->btin", local)
         + jnp.einsum("btinc,btnc->btin", phi_q, norm))
  out = num / den[..., None]
  return out.reshape(b_, t, n, h).astype(out_dtype)


# ----------------------------------------------------------------------------
# The official einsum form: three-operand einsums, phi never materialised.
# ----------------------------------------------------------------------------

def einsum_form_attention(q, k, v, q_features, k_features, *, degree=4,
                          block_size=256, causal=True):
  """PolySketch attention (local_exact) in the form of the google-research
  PolySketchFormer code, written from DESIGN §1.3.

  Per block t the state update is einsum('...ti,...tj,...td->...ijd', f_k,
  f_k, [v, 1]) (phi = f_k (x) f_k never formed; jnp.einsum picks the
  contraction order), an exclusive cumsum over blocks gives S_t, and the read
  is einsum('...ti,...tj,...ijd->...td', f_q, f_q, S_t); the diagonal blocks
  are exact, tril((q k^T)^p) [v, 1]. Non-causal: one state over all tokens,
  read by every query. GQA: k, v, f_k with fewer heads are repeated to the
  query heads. Autodiff for the backward; computes in float32; seq must be a
  multiple of block_size.
  """
  out_dtype = q.dtype
  q, k, v, fq, fk = (x.astype(jnp.float32) for x in (q, k, v, q_features, k_features))
  b_, t, n, h = q.shape
  if k.shape[2] != n:
    rep = n // k.shape[2]
    k, v, fk = (jnp.repeat(x, rep, axis=2) for x in (k, v, fk))
  v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
  if not causal:
    # [B, T, N, .] -> [B, N, T, .]
    fq_, fk_, v1_ = (jnp.swapaxes(x, 1, 2) for x in (fq, fk, v1))
    s = jnp.einsum("...ti,...tj,...td->...ijd", fk_, fk_, v1_)
    acc = jnp.einsum("...ti,...tj,...ijd->...td", fq_, fq_, s)
    out = acc[..., :h] / (1.0 + acc[..., h:])
    return jnp.swapaxes(out, 1, 2).astype(out_dtype)
  if t % block_size:
    raise ValueError(f"seq {t} must be a multiple of block_size {block_size}")
  nb = t // block_size
  # [B, T, N, D] -> [B, N, nb, b, D]
  blocks = lambda x: jnp.transpose(x.reshape(b_, nb, block_size, n, x.shape[-1]),
                                   (0, 3, 1, 2, 4))
  qb, kb, v1b, fqb, fkb = (blocks(x) for x in (q, k, v1, fq, fk))
  upd = jnp.einsum("...ti,...tj,...td->...ijd", fkb, fkb, v1b)   # [B, N, nb, r, r, H+1]
  state = jnp.cumsum(upd, axis=2)
  state = jnp.concatenate([jnp.zeros_like(state[:, :, :1]), state[:, :, :-1]], axis=2)
  prefix = jnp.einsum("...ti,...tj,...ijd->...td", fqb, fqb, state)
  local = jnp.einsum("...id,...jd->...ij", qb, kb) ** degree
  local = jnp.where(jnp.tril(jnp.ones((block_size, block_size), bool)), local, 0.0)
  acc = prefix + jnp.einsum("...ij,...jd->...id", local, v1b)
  out = acc[..., :h] / (1.0 + acc[..., h:])                       # [B, N, nb, b, H]
  return jnp.transpose(out, (0, 2, 3, 1, 4)).reshape(b_, t, n, h).astype(out_dtype)


# ----------------------------------------------------------------------------
# Methods and inputs.
# ----------------------------------------------------------------------------

def softmax_implementation() -> str | None:
  return "cudnn" if jax.default_backend() == "gpu" else None


def make_method(name, cfg):
  degree, block = cfg["degree"], cfg["block_size"]
  causal = cfg.get("causal", True)
  if name == "polysketch":
    return lambda q, k, v, fq, fk: ps.polysketch_attention(
        q, k, v, fq, fk, degree=degree, block_size=block, causal=causal,
        local_exact=True, implementation="xla")
  if name == "plain":
    if not causal or cfg.get("kv_heads", cfg["heads"]) != cfg["heads"]:
      raise ValueError("the plain baseline is causal multi-head attention only")
    return lambda q, k, v, fq, fk: plain_blocked_attention(
        q, k, v, fq, fk, degree=degree, block_size=block)
  if name == "einsum":
    return lambda q, k, v, fq, fk: einsum_form_attention(
        q, k, v, fq, fk, degree=degree, block_size=block, causal=causal)
  if name == "softmax":
    impl = softmax_implementation()
    return lambda q, k, v, fq, fk: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl)
  if name == "polynomial":
    return lambda q, k, v, fq, fk: ps.polynomial_attention(
        q, k, v, degree=degree, causal=causal)
  raise ValueError(f"unknown method {name!r}")


def differentiable_argnums(name):
  # Features are differentiable inputs of the sketched ops (a real model trains
  # the sketch through them); softmax and exact attention see q, k, v only.
  return (0, 1, 2, 3, 4) if name in ("polysketch", "plain", "einsum") else (0, 1, 2)


def build_fn(name, mode, cfg):
  method = make_method(name, cfg)
  if mode == "fwd":
    return jax.jit(method)
  argnums = differentiable_argnums(name)

  def loss(q, k, v, fq, fk, cot):
    return jnp.sum(method(q, k, v, fq, fk).astype(jnp.float32) * cot)

  grad = jax.grad(loss, argnums=argnums)
  return jax.jit(lambda q, k, v, fq, fk, cot: grad(q, k, v, fq, fk, cot))


def make_inputs(seq, dtype, cfg, seed=0):
  """LayerNorm-scaled q, k (unit variance per dim), v, random-sketch features;
  k, v and f_k with cfg["kv_heads"] heads (grouped-query attention)."""
  b_, n, h, r = cfg["batch"], cfg["heads"], cfg["head_dim"], cfg["sketch_dim"]
  kv_heads = cfg.get("kv_heads", n)
  kq, kk, kv, ks, kc = jax.random.split(jax.random.key(seed), 5)
  shape = (b_, seq, n, h)
  kv_shape = (b_, seq, kv_heads, h)
  layer_norm = lambda x: (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
  q = layer_norm(jax.random.normal(kq, shape)) / h ** 0.25
  k = layer_norm(jax.random.normal(kk, kv_shape)) / h ** 0.25
  v = jax.random.normal(kv, kv_shape)
  sketch = ps.random_sketch_init(ks, h, r, cfg["degree"])
  fq, fk = ps.random_sketch_features(sketch, q), ps.random_sketch_features(sketch, k)
  cot = jax.random.normal(kc, shape)
  args = tuple(jax.block_until_ready(x.astype(dtype)) for x in (q, k, v, fq, fk))
  return args, jax.block_until_ready(cot.astype(jnp.float32))


# ----------------------------------------------------------------------------
# Measuring one configuration.
# ----------------------------------------------------------------------------

def memory_of(compiled):
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # noqa: BLE001 - some backends do not implement it
    return {"error": f"{type(e).__name__}: {e}"}
  if m is None:
    return {"error": "memory_analysis() returned None"}
  out = {f: int(getattr(m, f"{f}_size_in_bytes", 0) or 0)
         for f in ("temp", "argument", "output", "alias", "generated_code")}
  out["total"] = out["temp"] + out["argument"] + out["output"]
  return out


def time_calls(run, *, min_reps, max_reps, min_total_s):
  times = []
  start = time.perf_counter()
  while len(times) < max_reps and (
      len(times) < min_reps or time.perf_counter() - start < min_total_s):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return times


def measure(name, mode, seq, dtype_name, cfg, inputs, opts, log=print):
  record = {"method": name, "mode": mode, "seq": seq, "dtype": dtype_name}
  args, cot = inputs
  call_args = args if mode == "fwd" else (*args, cot)
  fn = build_fn(name, mode, cfg)
  try:
    t0 = time.perf_counter()
    compiled = fn.lower(*call_args).compile()
    record["compile_s"] = time.perf_counter() - t0
  except Exception as e:  # noqa: BLE001 - a failed compile is a result
    record.update(status="error", error=f"compile: {type(e).__name__}: {e}"[:500])
    return record
  mem = memory_of(compiled)
  record["memory"] = mem
  total = mem.get("total")
  if total is not None and total > opts.budget_gib * GIB:
    record.update(status="oom",
                  note=f"OOM (predicted {total / GIB:.1f} GiB > budget {opts.budget_gib:g} GiB)")
    return record
  run = lambda: compiled(*call_args)
  try:
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    record["warmup_s"] = time.perf_counter() - t0
    # Long calls: two timed runs after the warm-up (the median is their mean).
    min_reps = opts.min_reps if record["warmup_s"] < opts.long_call_s else min(opts.min_reps, 2)
    times = time_calls(run, min_reps=min_reps, max_reps=opts.max_reps,
                       min_total_s=opts.min_time)
  except Exception as e:  # noqa: BLE001 - e.g. a real out-of-memory at run time
    record.update(status="error", error=f"run: {type(e).__name__}: {e}"[:500])
    return record
  med = statistics.median(times)
  record.update(status="ok", times_s=times, median_s=med,
                us_per_token=1e6 * med / (seq * cfg["batch"]))
  return record


# ----------------------------------------------------------------------------
# Report: table, JSON, plot.
# ----------------------------------------------------------------------------

def _cell(rec):
  if rec is None:
    return "-"
  if rec["status"] == "ok":
    s = rec["median_s"]
    return f"{s * 1e3:.0f} ms" if s < 10 else f"{s:.1f} s"
  if rec["status"] == "oom":
    return f"OOM({rec['memory']['total'] / GIB:.0f}G)"
  return "error"


def _mem(rec):
  if rec is None or "memory" not in rec or "total" not in rec["memory"]:
    return "-"
  return f"{rec['memory']['total'] / GIB:.2f}"


def speedups(results, baseline="softmax", method="polysketch"):
  """{(dtype, mode, seq): baseline median / method median} where both ran."""
  idx = {(r["method"], r["dtype"], r["mode"], r["seq"]): r for r in results}
  out = {}
  for (m, dt, mode, seq), r in idx.items():
    b = idx.get((baseline, dt, mode, seq))
    if m == method and r["status"] == "ok" and b is not None and b["status"] == "ok":
      out[(dt, mode, seq)] = b["median_s"] / r["median_s"]
  return out


def format_table(results, methods):
  idx = {(r["method"], r["dtype"], r["mode"], r["seq"]): r for r in results}
  dtypes = sorted({r["dtype"] for r in results}, key=lambda d: d != "float32")
  seqs = sorted({r["seq"] for r in results})
  lines = []
  for dt in dtypes:
    for mode in MODES:
      if not any(k[1] == dt and k[2] == mode for k in idx):
        continue
      lines.append(f"\n{dt}, {mode}: median time (and predicted peak memory, GiB)")
      head = f"{'seq':>6}"
      for m in methods:
        head += f" | {m:>22}"
      ratio_names = [m for m in methods if m != "softmax"] if "softmax" in methods else []
      for m in ratio_names:
        head += f" | {'softmax/' + m:>18}"
      if "einsum" in methods and "polysketch" in methods:
        head += f" | {'einsum/polysketch':>17}"
      if "polysketch" in methods:
        head += f" | {'ps us/tok':>9}"
      lines.append(head)
      lines.append("-" * len(head))
      for seq in seqs:
        row = f"{seq:>6}"
        for m in methods:
          rec = idx.get((m, dt, mode, seq))
          row += f" | {_cell(rec) + ' (' + _mem(rec) + ')':>22}"
        base = idx.get(("softmax", dt, mode, seq))
        for m in ratio_names:
          rec = idx.get((m, dt, mode, seq))
          if rec and base and rec["status"] == "ok" and base["status"] == "ok":
            cell = f"{base['median_s'] / rec['median_s']:.2f}x"
          elif rec and base and rec["status"] == "ok" and base["status"] == "oom":
            cell = "softmax OOM"
          else:
            cell = "-"
          row += f" | {cell:>18}"
        if "einsum" in methods and "polysketch" in methods:
          rec, e = idx.get(("polysketch", dt, mode, seq)), idx.get(("einsum", dt, mode, seq))
          ok = rec and e and rec["status"] == "ok" and e["status"] == "ok"
          cell = f"{e['median_s'] / rec['median_s']:.2f}x" if ok else "-"
          row += f" | {cell:>17}"
        if "polysketch" in methods:
          rec = idx.get(("polysketch", dt, mode, seq))
          tok = f"{rec['us_per_token']:.1f}" if rec and rec["status"] == "ok" else "-"
          row += f" | {tok:>9}"
        lines.append(row)
  return "\n".join(lines)


def plot(results, methods, path, title=None):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dtypes = sorted({r["dtype"] for r in results}, key=lambda d: d != "float32")
  fig, axes = plt.subplots(len(dtypes), len(MODES), figsize=(6.5 * len(MODES), 4.5 * len(dtypes)),
                           squeeze=False)
  ratios = speedups(results)
  einsum_ratios = speedups(results, baseline="einsum")
  colors = {"polysketch": "C0", "plain": "C2", "einsum": "C4", "softmax": "C3",
            "polynomial": "C1"}
  for i, dt in enumerate(dtypes):
    for j, mode in enumerate(MODES):
      ax = axes[i][j]
      for m in methods:
        rs = sorted((r for r in results if r["method"] == m and r["dtype"] == dt
                     and r["mode"] == mode), key=lambda r: r["seq"])
        ok = [r for r in rs if r["status"] == "ok"]
        if ok:
          ax.plot([r["seq"] for r in ok], [r["median_s"] for r in ok], "o-",
                  color=colors.get(m), label=METHOD_LABELS.get(m, m))
        oom = [r for r in rs if r["status"] != "ok"]
        for r in oom:
          ax.axvline(r["seq"], color=colors.get(m), alpha=0.15, lw=6)
        if oom:
          ax.plot([], [], color=colors.get(m), alpha=0.3, lw=6,
                  label=f"{METHOD_LABELS.get(m, m)}: OOM from {min(r['seq'] for r in oom)}")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length")
      ax.set_ylabel("median time (s)")
      ax.set_title(f"{dt}, {mode}" + (f" ({title})" if title else ""))
      ax.grid(True, which="both", alpha=0.3)
      pts = sorted((seq, v) for (d, mo, seq), v in ratios.items() if d == dt and mo == mode)
      epts = sorted((seq, v) for (d, mo, seq), v in einsum_ratios.items()
                    if d == dt and mo == mode)
      if pts or epts:
        ax2 = ax.twinx()
        if pts:
          ax2.plot([p[0] for p in pts], [p[1] for p in pts], "k--", marker="s",
                   label="speed-up softmax/PolySketch")
        if epts:
          ax2.plot([p[0] for p in epts], [p[1] for p in epts], ":", color="C4", marker="^",
                   label="speed-up einsum form/PolySketch")
        ax2.set_yscale("log")
        ax2.axhline(1.0, color="k", lw=0.5)
        ax2.set_ylabel("speed-up (baseline time / PolySketch time)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
      else:
        ax.legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def machine_info():
  info = {
      "hostname": platform.node(),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
  }
  try:
    import jaxlib
    info["jaxlib"] = jaxlib.__version__
  except Exception:  # noqa: BLE001
    pass
  try:
    info["affinity_cpus"] = len(os.sched_getaffinity(0))
  except AttributeError:
    pass
  try:
    with open("/proc/meminfo") as f:
      info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
  except OSError:
    pass
  try:
    info["loadavg_start"] = os.getloadavg()
  except OSError:
    pass
  return info


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seqs", type=int, nargs="+", default=None,
                 help="sequence lengths (default 1k..64k; --quick: 1k 2k 4k)")
  p.add_argument("--dtypes", nargs="+", default=None, choices=("float32", "bfloat16"),
                 help="default float32 bfloat16 (--quick: float32)")
  p.add_argument("--methods", nargs="+", default=None,
                 choices=("polysketch", "plain", "einsum", "softmax", "polynomial"),
                 help="default polysketch softmax polynomial")
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  p.add_argument("--baseline-plain", action="store_true",
                 help="also time the plain blocked-einsum baseline")
  p.add_argument("--baseline-einsum", action="store_true",
                 help="also time the official three-operand einsum form")
  p.add_argument("--quick", action="store_true", help="seq 1k-4k, float32, fewer reps")
  p.add_argument("--non-causal", action="store_true",
                 help="non-causal attention (default causal)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv-heads", type=int, default=None,
                 help="grouped-query attention: k, v heads (default --heads)")
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--sketch-dim", type=int, default=32)
  p.add_argument("--block-size", type=int, default=256)
  p.add_argument("--degree", type=int, default=4)
  p.add_argument("--budget-gib", type=float, default=16.0,
                 help="skip (record OOM) configurations predicted above this")
  p.add_argument("--min-reps", type=int, default=3)
  p.add_argument("--max-reps", type=int, default=10)
  p.add_argument("--min-time", type=float, default=2.0,
                 help="keep repeating (up to --max-reps) until this many seconds")
  p.add_argument("--long-call-s", type=float, default=15.0,
                 help="a configuration whose warm-up call took longer gets 2 timed runs")
  p.add_argument("--max-run-s", type=float, default=60.0,
                 help="skip longer seqs of a method/mode/dtype once one call took this long")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "results"))
  p.add_argument("--tag", default=None, help="file name stem (default attention-BACKEND-TIME)")
  p.add_argument("--no-plot", action="store_true")
  args = p.parse_args(argv)
  if args.seqs is None:
    args.seqs = [1024, 2048, 4096] if args.quick else list(DEFAULT_SEQS)
  if args.dtypes is None:
    args.dtypes = ["float32"] if args.quick else ["float32", "bfloat16"]
  if args.methods is None:
    args.methods = ["polysketch", "softmax", "polynomial"]
  if args.baseline_plain and "plain" not in args.methods:
    args.methods.insert(1, "plain")
  if args.baseline_einsum and "einsum" not in args.methods:
    args.methods.insert(1, "einsum")
  if args.quick:
    args.min_reps, args.max_reps, args.min_time = 2, 5, 1.0
  return args


def main(argv=None):
  opts = parse_args(argv)
  cfg = {"batch": opts.batch, "heads": opts.heads, "head_dim": opts.head_dim,
         "sketch_dim": opts.sketch_dim, "block_size": opts.block_size,
         "degree": opts.degree, "causal": not opts.non_causal,
         "kv_heads": opts.kv_heads or opts.heads}
  meta = machine_info()
  meta.update(config=cfg, args=vars(opts).copy(),
              softmax_implementation=softmax_implementation() or "xla",
              started=datetime.datetime.now().isoformat(timespec="seconds"))
  print(f"# {meta['backend']} ({meta['device_kind']}), {meta['cpu_count']} cpus, "
        f"jax {meta['jax']}; {'causal' if cfg['causal'] else 'non-causal'}, "
        f"B={cfg['batch']} N={cfg['heads']} K={cfg['kv_heads']} H={cfg['head_dim']} "
        f"r={cfg['sketch_dim']} b={cfg['block_size']} p={cfg['degree']}; "
        f"budget {opts.budget_gib:g} GiB", flush=True)
  results = []
  slow = set()  # (method, mode, dtype) that passed --max-run-s: skip longer seqs
  for dtype_name in opts.dtypes:
    dtype = jnp.dtype(dtype_name)
    for seq in sorted(opts.seqs):
      inputs = make_inputs(seq, dtype, cfg)
      for name in opts.methods:
        for mode in opts.modes:
          if (name, mode, dtype_name) in slow:
            rec = {"method": name, "mode": mode, "seq": seq, "dtype": dtype_name,
                   "status": "skipped", "note": f"a shorter seq took > {opts.max_run_s:g} s"}
          else:
            rec = measure(name, mode, seq, dtype_name, cfg, inputs, opts)
            if rec["status"] == "ok" and rec["median_s"] > opts.max_run_s:
              slow.add((name, mode, dtype_name))
          results.append(rec)
          msg = _cell(rec) if rec["status"] != "skipped" else "skipped"
          extra = (f"compile {rec['compile_s']:.1f} s, " if "compile_s" in rec else "")
          print(f"  {dtype_name:8} seq {seq:6} {name:10} {mode:7}: {msg:>10}  "
                f"({extra}mem {_mem(rec)} GiB){'  ' + rec.get('error', '') if rec['status'] == 'error' else ''}",
                flush=True)
      del inputs
  meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
  try:
    meta["loadavg_end"] = os.getloadavg()
  except OSError:
    pass
  ratios = {f"{dt}/{mode}/{seq}": v for (dt, mode, seq), v in speedups(results).items()}
  report = {"meta": meta, "results": results, "speedup_softmax_over_polysketch": ratios}
  if "plain" in opts.methods:
    report["speedup_softmax_over_plain"] = {
        f"{dt}/{mode}/{seq}": v
        for (dt, mode, seq), v in speedups(results, method="plain").items()}
  if "einsum" in opts.methods:
    report["speedup_softmax_over_einsum"] = {
        f"{dt}/{mode}/{seq}": v
        for (dt, mode, seq), v in speedups(results, method="einsum").items()}
    report["speedup_einsum_over_polysketch"] = {
        f"{dt}/{mode}/{seq}": v
        for (dt, mode, seq), v in speedups(results, baseline="einsum").items()}
  os.makedirs(opts.out_dir, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  stem = opts.tag or f"attention-{meta['backend']}-{stamp}"
  json_path = os.path.join(opts.out_dir, stem + ".json")
  with open(json_path, "w") as f:
    json.dump(report, f, indent=1)
  table = format_table(results, opts.methods)
  print(table)
  print(f"\nwrote {json_path}")
  if not opts.no_plot:
    png_path = os.path.join(opts.out_dir, stem + ".png")
    shape = (f"{'causal' if cfg['causal'] else 'non-causal'}, N={cfg['heads']}"
             + (f" K={cfg['kv_heads']}" if cfg["kv_heads"] != cfg["heads"] else ""))
    plot(results, opts.methods, png_path, title=shape)
    print(f"wrote {png_path}")
  return report


if __name__ == "__main__":
  main()
