"""`polysketch-compare`: PolySketch attention against exact polynomial and softmax attention.

For each sequence length, draws random q, k, v, normalises them with a
LayerNorm (no learned scale), draws one random sketch, and prints a table:
the relative error of PolySketch attention (the blocked `xla` path) against
exact polynomial attention and against softmax attention
(`jax.nn.dot_product_attention`), and the time of each, all causal.

Relative error is ||a - b|| / ||b|| over the whole output (Frobenius norm).
Times are the median of up to `--repeats` calls (fewer once they have taken
a second) after a warm-up call that compiles, each ended by
`block_until_ready`; PolySketch's time includes computing the sketch
features.

    polysketch-compare                    # lengths 512 1024 2048 4096
    polysketch-compare --lengths 8192 --heads 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_polysketch import _validation
from pallas_polysketch.attention import polysketch_attention
from pallas_polysketch.polynomial import polynomial_attention
from pallas_polysketch.sketches import random_sketch_features, random_sketch_init

COLUMNS = ("seq", "err vs poly", "err vs softmax", "poly vs softmax",
           "polysketch ms", "poly ms", "softmax ms")


def _layer_norm(x, eps=1e-5):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _time_ms(fn, *args, repeats: int, budget_s: float = 1.0) -> tuple[float, jax.Array]:
  """Median of up to `repeats` calls after a warm-up call; stops once the
  timed calls have taken `budget_s` (always at least one)."""
  out = jax.block_until_ready(fn(*args))  # warm-up: compiles
  times = []
  while len(times) < max(repeats, 1) and sum(times) < budget_s:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), out


def run(lengths, *, batch=1, heads=4, head_dim=64, sketch_dim=32, degree=4,
        block_size=256, repeats=3, seed=0) -> list[dict]:
  """Measures each length; returns one dict per length keyed by COLUMNS."""
  key_sketch, key_data = jax.random.split(jax.random.key(seed))
  sketch = random_sketch_init(key_sketch, head_dim, sketch_dim, degree)

  @jax.jit
  def polysketch(q, k, v):
    fq = random_sketch_features(sketch, q)
    fk = random_sketch_features(sketch, k)
    return polysketch_attention(q, k, v, fq, fk, degree=degree, block_size=block_size,
                                causal=True, implementation="xla")

  @jax.jit
  def poly(q, k, v):
    return polynomial_attention(q, k, v, degree=degree, causal=True)

  @jax.jit
  def softmax(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)

  rows = []
  for seq in lengths:
    keys = jax.random.split(jax.random.fold_in(key_data, seq), 3)
    q, k, v = (_layer_norm(jax.random.normal(kk, (batch, seq, heads, head_dim)))
               for kk in keys)
    t_sketch, out_sketch = _time_ms(polysketch, q, k, v, repeats=repeats)
    t_poly, out_poly = _time_ms(poly, q, k, v, repeats=repeats)
    t_soft, out_soft = _time_ms(softmax, q, k, v, repeats=repeats)
    rows.append({
        "seq": seq,
        "err vs poly": _relative_error(out_sketch, out_poly),
        "err vs softmax": _relative_error(out_sketch, out_soft),
        "poly vs softmax": _relative_error(out_poly, out_soft),
        "polysketch ms": t_sketch,
        "poly ms": t_poly,
        "softmax ms": t_soft,
    })
  return rows


def format_table(rows) -> str:
  widths = [max(len(c), 10) for c in COLUMNS]
  lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
  for row in rows:
    cells = [str(row["seq"])]
    cells += [f"{row[c]:.4f}" for c in COLUMNS[1:4]]
    cells += [f"{row[c]:.2f}" for c in COLUMNS[4:]]
    lines.append("  ".join(s.rjust(w) for s, w in zip(cells, widths)))
  return "\n".join(lines)


def _parse(argv):
  parser = argparse.ArgumentParser(
      prog="polysketch-compare",
      description="PolySketch attention vs exact polynomial and softmax attention "
                  "on random LayerNorm-normalised inputs (causal).")
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                      help="sequence lengths (default: 512 1024 2048 4096)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--sketch-dim", type=int, default=32, help="r (default 32)")
  parser.add_argument("--degree", type=int, default=4,
                      help="p, a power of two; 2 makes the features exact (default 4)")
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3, help="at most this many timed calls per measurement (default 3)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  # Checked before any work, naming the flag (a negative length failed after
  # the header with numpy's OverflowError; --repeats -1 was taken as 1).
  if any(n <= 0 for n in args.lengths):
    parser.error(f"--lengths must be positive ints, got {args.lengths}")
  for name in ("batch", "heads", "head_dim", "sketch_dim", "repeats"):
    if getattr(args, name) <= 0:
      parser.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
  if args.seed < 0:
    parser.error(f"--seed must be an int >= 0, got {args.seed}")
  if args.block_size <= 0 or args.block_size % 8:
    parser.error(f"--block-size must be a positive multiple of 8, got {args.block_size}")
  if args.degree < 2 or not _validation.is_power_of_two(args.degree):
    parser.error(f"--degree must be a power of two (2, 4, 8, ...), got {args.degree}")
  return args


def main(argv=None) -> int:
  args = _parse(argv)
  device = jax.devices()[0]
  print(f"PolySketch attention (xla path) on {device.platform} ({device.device_kind}), "
        f"jax {jax.__version__}")
  print(f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, "
        f"random sketch r={args.sketch_dim} degree {args.degree}, "
        f"block {args.block_size}, causal, float32")
  print("errors: ||a - b|| / ||b||; times: median of up to "
        f"{args.repeats} calls (at most ~1 s of calls) after warm-up", flush=True)
  rows = run(args.lengths, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
             sketch_dim=args.sketch_dim, degree=args.degree, block_size=args.block_size,
             repeats=args.repeats, seed=args.seed)
  print(format_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
