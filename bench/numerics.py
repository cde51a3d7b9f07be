"""Forward and gradient accuracy of PolySketch attention at long context (issue 11).

For each (path, T, degree, head_dim H, dtype) it runs `polysketch_attention`
(causal, local_exact, block 256, bias 1) on one sequence and one head and
compares against float64 ground truth:

  outputs    on R sampled query rows (the first, second and last rows of the
             first block, rows around block boundaries, the last block, the
             rest spread over the sequence), computed directly in numpy float64
             from the op's inputs by DESIGN §1.3: w_ij = (q_i.k_j)^p for j in
             row i's block, (f_q,i . f_k,j)^2 before it; o_i = sum w v / (1 +
             sum w). Also the denominator of every row (numpy float64, blocked).
  gradients  of the sampled-rows loss L = sum_i c_i . o_i (c_i ~ N(0, 1))
             w.r.t. q, k, v, q_features and k_features, at every position,
             against the same numpy float64 evaluation differentiated by hand
             (per sampled row: a_ij = dL/dw_ij = c_i . (v_j - o_i) / den_i,
             then the chain rule through (q.k)^p and (f_q.f_k)^2; O(R T H)).
  cross-check  the package's own `implementation="xla"` in float64 under
             `jax.enable_x64` (tested against the quadratic reference at small
             T) on the same inputs: its outputs on every row (a second forward
             reference) and its gradients, against numpy.

Errors are max |x - ref| / max |ref| over the compared entries (per tensor for
gradients; the table shows the worst of the five). Inputs look like what the
Flax layer feeds the op: q and k LayerNorm'd per head vector (zero mean, unit
variance, no affine) built around a few shared "topic" directions, so that a
sixteenth of all (q_i, k_j) pairs are nearly aligned (q.k ~ 0.8 H, weights
~ (0.8 H)^p, denominators >> 1), v ~ N(0, 1), features from
`random_sketch_features` (gaussian, unbiased) of q and k with a sketch of the
run's degree. Inputs are rounded to bfloat16 values once, so the float32 and
bfloat16 runs see the same numbers and share one reference.

Paths: "xla", and "pallas" with interpret=True (the TPU kernels on CPU). The
interpreter is superlinear in T on CPU (see the notes), so pallas runs at
shorter T for the full grid and at --pallas-long-seq for a few configurations.

A second part (on by default, --no-overflow skips it) works out where float32
runs out: the analytic bounds (den <= bias + T max_j w_ij, w <= H^p for
LayerNorm'd q, k) and deliberately overflowing inputs, sorting rows by their
float64 denominator (den <= 2^126; 2^126 < den <= float32 max, where 1/den is
subnormal and flushed to zero; den > float32 max) and counting what the op
returned there: NaN, inf, or finite (all zero = silently wrong).

  JAX_PLATFORMS=cpu python bench/numerics.py              # the full grid (26 min, 2 shared cores)
  JAX_PLATFORMS=cpu python bench/numerics.py --quick      # 4k/8k, ~3 min

Writes bench/results/<tag>.json and <tag>.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import pallas_polysketch as ps

F32_MAX = float(np.finfo(np.float32).max)
# Above this 1/den is subnormal, and CPU and TPU flush subnormals to zero.
F32_TINY_RECIP = 2.0 ** 126
GRAD_NAMES = ("q", "k", "v", "q_features", "k_features")
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def layer_norm(x, eps=1e-5):
  x = x - x.mean(-1, keepdims=True)
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def to_bf16_values(x):
  """float64 numpy -> the nearest bfloat16 values, as float64 numpy."""
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32),
                    np.float64)


def make_inputs(seq, head_dim, degree, sketch_dim, *, topics, noise, seed):
  """q, k, v [T, H], fq, fk [T, r] (float64 numpy holding bfloat16 values) and the
  sketch params. q_i = LN(c_m(i) + noise n_i), k_i = LN(c_m(i) + noise n'_i)
  with m(i) uniform over `topics` random directions."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((topics, head_dim))
  topic = rng.integers(0, topics, seq)
  q = layer_norm(centres[topic] + noise * rng.standard_normal((seq, head_dim)))
  k = layer_norm(centres[topic] + noise * rng.standard_normal((seq, head_dim)))
  v = rng.standard_normal((seq, head_dim))
  q, k, v = (to_bf16_values(x) for x in (q, k, v))
  params = ps.random_sketch_init(jax.random.key(seed), head_dim, sketch_dim, degree)
  feats = jax.jit(ps.random_sketch_features)
  fq = to_bf16_values(np.asarray(feats(params, jnp.asarray(q, jnp.float32)), np.float64))
  fk = to_bf16_values(np.asarray(feats(params, jnp.asarray(k, jnp.float32)), np.float64))
  return q, k, v, fq, fk


def sample_rows(seq, block_size, count):
  """Sorted distinct query rows: the first block's first, second and last rows,
  the first rows of the second block, the last block's first and last rows and
  the rest spread (log-spaced, then linearly) over the sequence."""
  fixed = {0, 1, block_size - 1, block_size, block_size + 1,
           seq - block_size, seq - 1, seq // 2, seq // 2 - 1}
  fixed = {i for i in fixed if 0 <= i < seq}
  extra = np.unique(np.geomspace(2 * block_size, seq - 2, max(count - len(fixed), 1)).astype(int))
  extra = extra[extra < seq]  # below 2 blocks + 2 tokens geomspace starts past the end
  rows = sorted(fixed | set(extra.tolist()))
  while len(rows) > count:  # drop from the middle of the spread part
    spread = [r for r in rows if r not in fixed]
    rows.remove(spread[len(spread) // 2])
  return np.asarray(rows)


# ----------------------------------------------------------------------------
# float64 ground truth (numpy, straight from DESIGN §1.3)
# ----------------------------------------------------------------------------

def reference_rows(q, k, v, fq, fk, rows, c, *, degree, block_size, bias=1.0):
  """Outputs, denominators of the sampled rows and the gradients of
  L = sum_n c_n . o_rows[n] w.r.t. every input. All float64, O(R T H)."""
  out = np.zeros((len(rows), q.shape[1]))
  den = np.zeros(len(rows))
  grads = {name: np.zeros_like(x) for name, x in zip(GRAD_NAMES, (q, k, v, fq, fk))}
  dq, dk, dv, dfq, dfk = (grads[n] for n in GRAD_NAMES)
  for n, i in enumerate(rows):
    s = (i // block_size) * block_size
    e = k[s:i + 1] @ q[i]            # local: exact (q.k)^p
    wl = e ** degree
    g = fk[:s] @ fq[i]               # before the block: (f_q . f_k)^2
    wp = g * g
    d = bias + wl.sum() + wp.sum()
    o = (wl @ v[s:i + 1] + wp @ v[:s]) / d
    out[n], den[n] = o, d
    ci = c[n]
    co = ci @ o
    al = (v[s:i + 1] @ ci - co) / d  # dL/dw_ij
    ap = (v[:s] @ ci - co) / d
    dv[s:i + 1] += np.outer(wl / d, ci)
    dv[:s] += np.outer(wp / d, ci)
    cl = al * degree * e ** (degree - 1)
    dq[i] += cl @ k[s:i + 1]
    dk[s:i + 1] += np.outer(cl, q[i])
    cp = ap * 2.0 * g
    dfq[i] += cp @ fk[:s]
    dfk[:s] += np.outer(cp, fq[i])
  return out, den, grads


def all_denominators(q, k, fq, fk, *, degree, block_size, bias=1.0, chunk_blocks=32):
  """den_i = bias + sum_j w_ij for every row (float64, blocked; T a multiple of b)."""
  seq, r = fq.shape
  nb = seq // block_size
  fkb = fk.reshape(nb, block_size, r)
  fqb = fq.reshape(nb, block_size, r)
  gram = np.einsum("tjr,tjs->trs", fkb, fkb)
  z = np.cumsum(gram, axis=0) - gram                       # exclusive prefix
  prefix = np.sum(np.matmul(fqb, z) * fqb, axis=-1).reshape(seq)
  local = np.empty(seq)
  tril = np.tril(np.ones((block_size, block_size), bool))
  qb = q.reshape(nb, block_size, -1)
  kb = k.reshape(nb, block_size, -1)
  for start in range(0, nb, chunk_blocks):
    e = np.matmul(qb[start:start + chunk_blocks], np.swapaxes(kb[start:start + chunk_blocks], 1, 2))
    w = np.where(tril, e ** degree, 0.0)
    local[start * block_size:(start + e.shape[0]) * block_size] = w.sum(-1).reshape(-1)
  return bias + local + prefix


# ----------------------------------------------------------------------------
# Running the op
# ----------------------------------------------------------------------------

def _op_kwargs(path, degree, block_size):
  kw = dict(degree=degree, block_size=block_size, implementation=path)
  if path == "pallas":
    kw["interpret"] = True
  return kw


def build_fns(path, degree, block_size, rows):
  """(forward, forward+gradient) of the op, jitted. Inputs [T, ...] 2-D, used as
  [1, T, 1, ...]; the gradient function returns (o [T, H], grads)."""
  kw = _op_kwargs(path, degree, block_size)
  rows = jnp.asarray(rows)
  expand = lambda x: x[None, :, None, :]

  def fwd(q, k, v, fq, fk):
    return ps.polysketch_attention(*(expand(x) for x in (q, k, v, fq, fk)), **kw)[0, :, 0]

  def fwd_grad(args, c):
    o, vjp = jax.vjp(fwd, *args)
    ct = jnp.zeros(o.shape, c.dtype).at[rows].set(c).astype(o.dtype)
    return o, vjp(ct)

  return jax.jit(fwd), jax.jit(fwd_grad)


def timed(fn, *args):
  """(compile s, run s, result): compile first, then one run."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  mid = time.perf_counter()
  result = jax.block_until_ready(compiled(*args))
  return mid - start, time.perf_counter() - mid, result


def rel_err(x, ref):
  x = np.asarray(x, np.float64)
  scale = float(np.max(np.abs(ref)))
  diff = np.abs(x - ref)
  if not np.all(np.isfinite(x)):
    return float("nan")
  return float(np.max(diff) / scale) if scale > 0 else float(np.max(diff))


def grad_errors(grads, ref):
  return {n: rel_err(g, ref[n]) for n, g in zip(GRAD_NAMES, grads)}


def xla_float64(inputs, rows, c, *, degree, block_size):
  """The package's xla path in float64: (o [T, H], grads), seconds."""
  with jax.enable_x64(True):
    fwd, fwd_grad = build_fns("xla", degree, block_size, rows)
    args = tuple(jnp.asarray(x, jnp.float64) for x in inputs)
    _, run_s, (o, grads) = timed(fwd_grad, args, jnp.asarray(c, jnp.float64))
    return np.asarray(o), [np.asarray(g) for g in grads], run_s


# ----------------------------------------------------------------------------
# The accuracy grid
# ----------------------------------------------------------------------------

def plan(args):
  """{(T, degree, H): [(path, dtype), ...]} in increasing T."""
  groups = {}
  for degree in args.degrees:
    for h in args.head_dims:
      for dtype in args.dtypes:
        for t in args.xla_seqs:
          groups.setdefault((t, degree, h), []).append(("xla", dtype))
        for t in args.pallas_seqs:
          groups.setdefault((t, degree, h), []).append(("pallas", dtype))
        if args.pallas_long_seq and f"{degree}x{h}" in args.pallas_long_configs:
          groups.setdefault((args.pallas_long_seq, degree, h), []).append(("pallas", dtype))
  return dict(sorted(groups.items()))


def run_group(key, runs, args, log):
  seq, degree, head_dim = key
  b = args.block_size
  t0 = time.perf_counter()
  inputs = make_inputs(seq, head_dim, degree, args.sketch_dim, topics=args.topics,
                       noise=args.noise, seed=args.seed + seq + 10 * degree + head_dim)
  q, k, v, fq, fk = inputs
  rows = sample_rows(seq, b, args.rows)
  rng = np.random.default_rng(args.seed)
  c = to_bf16_values(rng.standard_normal((len(rows), head_dim)))
  ref_out, ref_den_rows, ref_grads = reference_rows(*inputs, rows, c, degree=degree, block_size=b)
  den = all_denominators(q, k, fq, fk, degree=degree, block_size=b)
  ref_s = time.perf_counter() - t0
  # The sketched weight bound: (f_q.f_k)^2 <= |f_q|^2 |f_k|^2, against H^p.
  sketch_bound = float(np.max(np.sum(fq * fq, 1)) * np.max(np.sum(fk * fk, 1)))
  x64_out, x64_grads, x64_s = xla_float64(inputs, rows, c, degree=degree, block_size=b)
  group = {
      "seq": seq, "degree": degree, "head_dim": head_dim, "rows": rows.tolist(),
      "reference_s": ref_s, "xla_float64_s": x64_s,
      "max_den": float(den.max()), "max_den_rows": float(ref_den_rows.max()),
      "den_check_rows": float(np.max(np.abs(den[rows] - ref_den_rows) / ref_den_rows)),
      "max_qk_over_h": float(max(np.max(np.abs(np.sum(q * k, 1))), 0) / head_dim),
      "max_abs_out_ref": float(np.max(np.abs(ref_out))),
      "max_sketched_weight_bound_over_h_p": sketch_bound / float(head_dim) ** degree,
      "xla_float64_vs_numpy": {
          "out_rows": rel_err(x64_out[rows], ref_out),
          "grads": grad_errors(x64_grads, ref_grads),
      },
  }
  log(f"[{seq} p={degree} H={head_dim}] reference {ref_s:.1f}s, float64 xla {x64_s:.1f}s; "
      f"max den {group['max_den']:.3g}; float64 xla vs numpy: out "
      f"{group['xla_float64_vs_numpy']['out_rows']:.2e}, grads "
      f"{max(group['xla_float64_vs_numpy']['grads'].values()):.2e}")
  results = []
  for path, dtype in runs:
    dt = jnp.dtype(dtype)
    fwd, fwd_grad = build_fns(path, degree, b, rows)
    a = tuple(jnp.asarray(x, dt) for x in inputs)
    cc = jnp.asarray(c, jnp.float32)
    fwd_compile, fwd_s, o = timed(fwd, *a)
    grad_compile, grad_s, (o2, grads) = timed(fwd_grad, a, cc)
    o = np.asarray(o.astype(jnp.float32), np.float64)
    grads = [np.asarray(g.astype(jnp.float32), np.float64) for g in grads]
    gerr = grad_errors(grads, ref_grads)
    finite_grads = all(bool(np.all(np.isfinite(g))) for g in grads)
    res = {
        "path": path, "seq": seq, "degree": degree, "head_dim": head_dim, "dtype": dtype,
        "out_err_rows": rel_err(o[rows], ref_out),
        "out_err_all_rows_vs_xla64": rel_err(o, x64_out),
        "grad_err": gerr, "grad_err_max": max(gerr.values()),
        "grad_err_worst": max(gerr, key=gerr.get),
        "grad_err_vs_xla64": grad_errors(grads, dict(zip(GRAD_NAMES, x64_grads))),
        "max_den": group["max_den"],
        "finite_out": bool(np.all(np.isfinite(o))), "finite_grads": finite_grads,
        "fwd_s": fwd_s, "fwd_bwd_s": grad_s,
        "fwd_compile_s": fwd_compile, "fwd_bwd_compile_s": grad_compile,
    }
    results.append(res)
    log(f"  {path:6s} {dtype:8s} out {res['out_err_rows']:.2e} (all rows vs f64 xla "
        f"{res['out_err_all_rows_vs_xla64']:.2e}) grad {res['grad_err_max']:.2e} "
        f"({res['grad_err_worst']}) finite {res['finite_out']}/{finite_grads} "
        f"fwd {fwd_s:.1f}s fwd+bwd {grad_s:.1f}s")
  return group, results


# ----------------------------------------------------------------------------
# Overflow
# ----------------------------------------------------------------------------

def overflow_table(seqs=(2 ** 17, 2 ** 18), degrees=(4, 8, 16, 32), head_dims=(64, 128)):
  """Where den = bias + sum_j w_ij leaves float32's usable range, for
  LayerNorm'd q, k (|q| = |k| = sqrt(H), so |q.k| <= H and w <= H^p).
  worst: every key aligned with the query (q.k = H); typical: independent
  directions, E (q.k)^p ~ (p-1)!! H^(p/2). Two limits: 2^126 ~ 8.5e37, above
  which 1/den is subnormal and flushed to zero (outputs silently 0), and the
  float32 max 3.4e38 (den = inf). Returns log10 of the weights and of the T
  that reaches each limit, and the LayerNorm scale gamma (w <= (gamma^2 H)^p)
  at which T H^p gamma^(2p) reaches 2^126 for each T in seqs."""
  out = []
  lmax, ltiny = math.log10(F32_MAX), math.log10(F32_TINY_RECIP)
  for p in degrees:
    dfact = math.prod(range(p - 1, 0, -2))
    for h in head_dims:
      worst_w = p * math.log10(h)
      typical_w = math.log10(dfact) + p / 2 * math.log10(h)
      out.append({
          "degree": p, "head_dim": h, "log10_max_weight": worst_w,
          "log10_typical_weight": typical_w,
          "log10_T_recip_subnormal_worst": ltiny - worst_w,
          "log10_T_overflow_worst": lmax - worst_w,
          "log10_T_recip_subnormal_typical": ltiny - typical_w,
          "single_weight_overflows": worst_w > lmax,
          "gamma_recip_subnormal_at_T": {
              str(t): math.sqrt(10 ** ((ltiny - math.log10(t)) / p) / h) for t in seqs},
      })
  return out


def classify(o, ref_o, den_ref):
  """What the op returned on the rows of each denominator band (float64 den):
  "ok" den <= 2^126; "recip_subnormal" 2^126 < den <= float32 max (1/den is
  subnormal: flushed to zero on CPU and TPU); "over" den > float32 max."""
  finite = np.all(np.isfinite(o), axis=-1)
  nan = np.any(np.isnan(o), axis=-1)
  zero = np.all(o == 0, axis=-1)
  scale = np.max(np.abs(ref_o), axis=-1)
  err = np.max(np.abs(o - ref_o), axis=-1) / np.maximum(scale, 1e-300)
  bands = {"ok": den_ref <= F32_TINY_RECIP,
           "recip_subnormal": (den_ref > F32_TINY_RECIP) & (den_ref <= F32_MAX),
           "over": den_ref > F32_MAX}
  out = {}
  for name, m in bands.items():
    fin = m & finite
    out[name] = {
        "rows": int(m.sum()), "nan": int((m & nan).sum()),
        "inf_no_nan": int((m & ~nan & ~finite).sum()),
        "finite": int(fin.sum()), "finite_all_zero": int((fin & zero).sum()),
        "finite_max_rel_err": float(err[fin].max()) if fin.any() else None,
        "first_row": int(np.argmax(m)) if m.any() else None,
    }
  return out


def overflow_case(name, inputs, *, degree, block_size, paths, log, note):
  """Runs the op on deliberately large inputs; the float64 xla path (no
  overflow in float64) gives the reference on every row, cross-checked by numpy
  on sampled rows."""
  q, k, v, fq, fk = inputs
  seq = q.shape[0]
  rows = sample_rows(seq, block_size, 16)
  c = to_bf16_values(np.random.default_rng(1).standard_normal((len(rows), q.shape[1])))
  den = all_denominators(q, k, fq, fk, degree=degree, block_size=block_size)
  ref_rows_out, _, _ = reference_rows(*inputs, rows, c, degree=degree, block_size=block_size)
  x64_out, _, _ = xla_float64(inputs, rows, c, degree=degree, block_size=block_size)
  case = {"name": name, "note": note, "seq": seq, "degree": degree, "head_dim": q.shape[1],
          "sketch_dim": fq.shape[1], "max_den": float(den.max()),
          "rows_den_over_2_126": int((den > F32_TINY_RECIP).sum()),
          "rows_den_over_f32_max": int((den > F32_MAX).sum()),
          "xla_float64_vs_numpy_rows": rel_err(x64_out[rows], ref_rows_out), "runs": []}
  log(f"overflow case {name}: T={seq} p={degree}, max den {den.max():.3g}, "
      f"rows with den > 2^126 {(den > F32_TINY_RECIP).sum()}, > float32 max {(den > F32_MAX).sum()}")
  for path, dtype in paths:
    dt = jnp.dtype(dtype)
    fwd, fwd_grad = build_fns(path, degree, block_size, rows)
    a = tuple(jnp.asarray(x, dt) for x in inputs)
    _, run_s, (o, grads) = timed(fwd_grad, a, jnp.asarray(c, jnp.float32))
    o = np.asarray(o.astype(jnp.float32), np.float64)
    verdict = {"bands": classify(o, x64_out, den)}
    verdict.update(path=path, dtype=dtype, fwd_bwd_s=run_s,
                   grads_finite={n: bool(np.all(np.isfinite(np.asarray(g.astype(jnp.float32)))))
                                 for n, g in zip(GRAD_NAMES, grads)})
    case["runs"].append(verdict)
    bands = "; ".join(
        f"{n}: {d['rows']} rows, NaN {d['nan']}, inf {d['inf_no_nan']}, finite {d['finite']} "
        f"(all-zero {d['finite_all_zero']}, max err {d['finite_max_rel_err']})"
        for n, d in verdict["bands"].items() if d["rows"])
    log(f"  {path:6s} {dtype:8s} {bands}; grads finite {verdict['grads_finite']}")
  return case


def overflow_cases(args, log):
  b = args.block_size
  paths = [("xla", "float32"), ("xla", "bfloat16"), ("pallas", "float32"), ("pallas", "bfloat16")]
  cases = []
  rng = np.random.default_rng(7)
  t, h, r = args.overflow_seq, 64, args.sketch_dim
  lnq = lambda: to_bf16_values(layer_norm(rng.standard_normal((t, h))))

  # A: single weights overflow. Degree 32, LayerNorm'd q, k with q_i = k_i:
  # (q_i.k_i)^32 = 64^32 ~ 6e57 on the diagonal. Small features.
  q = lnq()
  feats = lambda: to_bf16_values(rng.standard_normal((t, r)) / math.sqrt(r))
  cases.append(overflow_case(
      "A_weight_overflow", (q, q.copy(), to_bf16_values(rng.standard_normal((t, h))), feats(), feats()),
      degree=32, block_size=b, paths=paths, log=log,
      note="degree 32, q_i = k_i LayerNorm'd (H=64): exact weights (q.k)^32 up to 64^32 ~ 6e57 "
           "overflow individually"))

  # B: every weight finite, their sum overflows. Degree 4, LayerNorm'd
  # independent q, k; features f = c u for all tokens (u a random unit vector),
  # so every sketched weight is c^4 = 1e35 and den_i ~ 1e35 (i - i mod b).
  # Below 4096 tokens that sum stays finite: nothing to show.
  if t < 4096:
    log(f"overflow cases B skipped: at T={t} their denominators stay below float32 max "
        "(they pass it from ~3.4k keys on)")
  else:
    u = rng.standard_normal(r)
    u /= np.linalg.norm(u)
    f = to_bf16_values(np.tile(1e35 ** 0.25 * u, (t, 1)))
    q, k = lnq(), lnq()
    for name, v, what in (
        ("B1_sum_overflow_zero_mean_v", to_bf16_values(rng.standard_normal((t, h))),
         "v ~ N(0, 1): the numerator stays finite"),
        ("B2_sum_overflow_positive_v", to_bf16_values(1.0 + 0.1 * rng.standard_normal((t, h))),
         "v ~ 1 + 0.1 N(0, 1): the numerator overflows too")):
      cases.append(overflow_case(
          name, (q, k, v, f, f.copy()), degree=4, block_size=b, paths=paths, log=log,
          note="degree 4, LayerNorm'd q, k; f_q = f_k = c u for every token with c^4 = 1e35: "
               f"each sketched weight 1e35 (finite), den > 3.4e38 from ~3.4k keys on; {what}"))

  # C: a LayerNorm'd model that overflows: degree 16, H = 128, every q and k
  # near one direction (one topic, noise 0.1: q.k ~ 0.99 H), the random sketch
  # of degree 16: w ~ 128^16 ~ 5e33, den ~ T 5e33 > 3.4e38 from T ~ 6.5e4.
  if args.overflow_long_seq:
    tl = args.overflow_long_seq
    inputs = make_inputs(tl, 128, 16, args.sketch_dim, topics=1, noise=0.1, seed=11)
    cases.append(overflow_case(
        "C_layernorm_degree16", inputs, degree=16, block_size=b,
        paths=[("xla", "float32"), ("xla", "bfloat16")], log=log,
        note=f"degree 16, H=128, T={tl}: LayerNorm'd q, k all near one direction "
             f"(q.k ~ 0.99 H), random sketch of degree 16, r={args.sketch_dim}"))
  return cases


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def _fmt_t(t):
  return f"{t // 1024}k" if t % 1024 == 0 else str(t)


def markdown(report):
  meta = report["meta"]
  lines = [
      "# PolySketch attention: accuracy at long context (bench/numerics.py)", "",
      f"Command: `{meta['command']}`  ",
      f"jax {meta['jax']}, {meta['backend']} backend, {meta['cpu_count']} CPUs, "
      f"{meta['platform']}; started {meta['started']}, total {meta['elapsed_s'] / 60:.1f} min.", "",
      f"B=1, 1 head, block {meta['block_size']}, causal, local_exact, bias 1, random sketch "
      f"(gaussian, unbiased) with sketch_dim {meta['sketch_dim']}; q, k LayerNorm'd around "
      f"{meta['topics']} topic directions (noise {meta['noise']}), v ~ N(0, 1); inputs hold "
      f"bfloat16 values. Errors: max |x - ref| / max |ref|; outputs on {meta['rows']} sampled "
      "rows against numpy float64, gradients of sum_i c_i . o_i (sampled rows) w.r.t. q, k, v, "
      "f_q, f_k at every position against numpy float64 (worst tensor shown). Times: one run "
      "after compiling, seconds.", "",
      "| path | T | p | H | dtype | out err | out err, all rows vs f64 xla | grad err (worst) "
      "| max den | finite out / grads | fwd s | fwd+bwd s |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in report["results"]:
    path = "pallas (interpret)" if r["path"] == "pallas" else r["path"]
    lines.append(
        f"| {path} | {_fmt_t(r['seq'])} | {r['degree']} | {r['head_dim']} | {r['dtype']} "
        f"| {r['out_err_rows']:.1e} | {r['out_err_all_rows_vs_xla64']:.1e} "
        f"| {r['grad_err_max']:.1e} ({r['grad_err_worst']}) | {r['max_den']:.2e} "
        f"| {'yes' if r['finite_out'] else 'NO'} / {'yes' if r['finite_grads'] else 'NO'} "
        f"| {r['fwd_s']:.1f} | {r['fwd_bwd_s']:.1f} |")
  lines += ["", "Reference cross-check (the package's xla path in float64 against numpy "
            "float64, same inputs):", "",
            "| T | p | H | out | grads (worst) | max den | max q.k / H | max |f_q|^2 |f_k|^2 / H^p |",
            "|---|---|---|---|---|---|---|---|"]
  for g in report["groups"]:
    x = g["xla_float64_vs_numpy"]
    lines.append(f"| {_fmt_t(g['seq'])} | {g['degree']} | {g['head_dim']} | {x['out_rows']:.1e} "
                 f"| {max(x['grads'].values()):.1e} | {g['max_den']:.2e} "
                 f"| {g['max_qk_over_h']:.2f} | {g['max_sketched_weight_bound_over_h_p']:.2g} |")
  if report.get("overflow_table"):
    lines += ["", "## Where float32 runs out", "",
              "den_i = 1 + sum_{j<=i} w_ij. LayerNorm'd q, k have |q| = |k| = sqrt(H), so an exact "
              "weight is at most H^p (q parallel to k); independent directions give "
              "E (q.k)^p ~ (p-1)!! H^(p/2). Two limits (float32 and bfloat16 alike): "
              "2^126 = 8.5e37, above which 1/den is subnormal and flushed to zero on CPU and TPU, "
              "and the float32 max 3.4e38 (den = inf). T columns: the sequence length at which "
              "T x weight reaches the limit.", "",
              "| p | H | max weight H^p | typical weight | T: T H^p > 2^126 | T: T H^p > 3.4e38 "
              "| T: typical > 2^126 | LN scale gamma reaching 2^126 at T = 128k / 256k |",
              "|---|---|---|---|---|---|---|---|"]
    at = lambda x: "any T" if x <= 0 else f"1e{x:.1f}"
    for r in report["overflow_table"]:
      g = r["gamma_recip_subnormal_at_T"]
      alone = " (overflows alone)" if r["single_weight_overflows"] else ""
      lines.append(
          f"| {r['degree']} | {r['head_dim']} | 1e{r['log10_max_weight']:.1f}{alone} "
          f"| 1e{r['log10_typical_weight']:.1f} | {at(r['log10_T_recip_subnormal_worst'])} "
          f"| {at(r['log10_T_overflow_worst'])} | {at(r['log10_T_recip_subnormal_typical'])} "
          f"| {' / '.join(f'{x:.2f}' for x in g.values())} |")
  if report.get("overflow_cases"):
    lines += ["", "Deliberately overflowing inputs: what the op returns on the rows of each "
              "float64-denominator band (ok: den <= 2^126; subnormal 1/den: 2^126 < den <= "
              "3.4e38; over: den > 3.4e38). Cells: rows / NaN rows / inf rows / finite rows "
              "(of which all zero), and the max relative error of the finite rows.", "",
              "| case | path | dtype | den <= 2^126 | 2^126 < den <= 3.4e38 | den > 3.4e38 "
              "| grads finite |",
              "|---|---|---|---|---|---|---|"]

    def cell(d):
      if not d["rows"]:
        return "–"
      err = "" if d["finite_max_rel_err"] is None else f", err {d['finite_max_rel_err']:.2g}"
      return (f"{d['rows']} / {d['nan']} / {d['inf_no_nan']} / {d['finite']} "
              f"({d['finite_all_zero']} zero){err}")

    for case in report["overflow_cases"]:
      for r in case["runs"]:
        gf = "all" if all(r["grads_finite"].values()) else (
            "none" if not any(r["grads_finite"].values()) else
            "only " + ", ".join(n for n, ok in r["grads_finite"].items() if ok))
        b = r["bands"]
        lines.append(f"| {case['name']} (T={_fmt_t(case['seq'])}) | {r['path']} | {r['dtype']} "
                     f"| {cell(b['ok'])} | {cell(b['recip_subnormal'])} | {cell(b['over'])} "
                     f"| {gf} |")
    lines += [""] + [f"- {c['name']}: {c['note']}; max den {c['max_den']:.2e}." for c in
                     report["overflow_cases"]]
  return "\n".join(lines) + "\n"


def write(report, out_dir, tag):
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / f"{tag}.json").write_text(json.dumps(report, indent=1))
  (out_dir / f"{tag}.md").write_text(markdown(report))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--xla-seqs", type=int, nargs="*", default=[131072, 262144])
  parser.add_argument("--pallas-seqs", type=int, nargs="*", default=[16384, 32768])
  parser.add_argument("--pallas-long-seq", type=int, default=131072)
  parser.add_argument("--pallas-long-configs", nargs="*", default=["8x128"],
                      help="degree x head_dim pairs run on pallas at --pallas-long-seq")
  parser.add_argument("--degrees", type=int, nargs="+", default=[4, 8])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  parser.add_argument("--sketch-dim", type=int, default=32)
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--rows", type=int, default=16)
  parser.add_argument("--topics", type=int, default=16)
  parser.add_argument("--noise", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-overflow", action="store_true")
  parser.add_argument("--overflow-seq", type=int, default=8192)
  parser.add_argument("--overflow-long-seq", type=int, default=131072)
  parser.add_argument("--quick", action="store_true",
                      help="xla at 4k/8k, pallas at 4k, small overflow cases")
  parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS_DIR)
  parser.add_argument("--tag", default="numerics")
  args = parser.parse_args(argv)
  if args.quick:
    args.xla_seqs, args.pallas_seqs, args.pallas_long_seq = [4096, 8192], [4096], 0
    args.overflow_seq, args.overflow_long_seq = 4096, 0

  started = time.perf_counter()
  report = {
      "meta": {
          "command": " ".join(["python", "bench/numerics.py"] + (sys.argv[1:] if argv is None else argv)),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "python": platform.python_version(),
          "started": datetime.datetime.now().isoformat(timespec="seconds"),
          "block_size": args.block_size, "sketch_dim": args.sketch_dim, "rows": args.rows,
          "topics": args.topics, "noise": args.noise, "batch": 1, "heads": 1,
          "args": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
      },
      "groups": [], "results": [],
  }

  def log(msg):
    print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

  def save():
    report["meta"]["elapsed_s"] = time.perf_counter() - started
    write(report, args.out_dir, args.tag)

  for key, runs in plan(args).items():
    group, results = run_group(key, runs, args, log)
    report["groups"].append(group)
    report["results"].extend(results)
    save()
  # Interpret-mode time against a linear extrapolation from the shortest T.
  extrap = []
  for r in report["results"]:
    if r["path"] != "pallas":
      continue
    base = [s for s in report["results"] if s["path"] == "pallas" and s["dtype"] == r["dtype"]
            and s["degree"] == r["degree"] and s["head_dim"] == r["head_dim"]]
    base = min(base, key=lambda s: s["seq"])
    if base["seq"] < r["seq"]:
      f = r["seq"] / base["seq"]
      extrap.append({"dtype": r["dtype"], "degree": r["degree"], "head_dim": r["head_dim"],
                     "from_seq": base["seq"], "seq": r["seq"],
                     "fwd_linear_s": base["fwd_s"] * f, "fwd_s": r["fwd_s"],
                     "fwd_bwd_linear_s": base["fwd_bwd_s"] * f, "fwd_bwd_s": r["fwd_bwd_s"]})
  report["pallas_interpret_scaling"] = extrap
  if not args.no_overflow:
    report["overflow_table"] = overflow_table()
    report["overflow_cases"] = overflow_cases(args, log)
  save()
  log(f"wrote {args.out_dir / args.tag}.json and .md")
  return report


if __name__ == "__main__":
  main()
