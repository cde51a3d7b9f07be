"""Interpret-mode cost: the Pallas kernels run on CPU vs the `xla` path.

Usage: python bench/interpret_overhead.py [--seq 2048] [--heads 2] [--repeats 5]
Prints the median forward (and forward+backward) time of each and the ratio.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

import pallas_polysketch as ps


def _median_time(fn, repeats):
  jax.block_until_ready(fn())  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--sketch-dim", type=int, default=32)
  parser.add_argument("--block-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  keys = jax.random.split(jax.random.key(0), 5)
  shape = (1, args.seq, args.heads, args.head_dim)
  q, k, v = (jax.random.normal(key, shape) / args.head_dim ** 0.5 for key in keys[:3])
  fq, fk = (jax.random.normal(key, shape[:3] + (args.sketch_dim,)) / args.sketch_dim ** 0.5
            for key in keys[3:])
  results = {}
  for name, kw in (("xla", dict(implementation="xla")),
                   ("pallas-interpret", dict(implementation="pallas", interpret=True))):
    fwd = jax.jit(lambda *a, kw=kw: ps.polysketch_attention(*a, block_size=args.block_size, **kw))
    grad = jax.jit(jax.grad(lambda *a, kw=kw: jnp.sum(ps.polysketch_attention(
        *a, block_size=args.block_size, **kw)), argnums=(0, 1, 2, 3, 4)))
    results[name] = (_median_time(lambda: fwd(q, k, v, fq, fk), args.repeats),
                     _median_time(lambda: grad(q, k, v, fq, fk), args.repeats))
  print(f"B=1 N={args.heads} T={args.seq} H={args.head_dim} r={args.sketch_dim} "
        f"b={args.block_size}, f32, CPU, median of {args.repeats}")
  print(f"{'path':18s} {'fwd s':>8s} {'fwd+bwd s':>10s}")
  for name, (f, g) in results.items():
    print(f"{name:18s} {f:8.3f} {g:10.3f}")
  (xf, xg), (pf, pg) = results["xla"], results["pallas-interpret"]
  print(f"interpret / xla: forward {pf / xf:.2f}x, forward+backward {pg / xg:.2f}x")


if __name__ == "__main__":
  main()
