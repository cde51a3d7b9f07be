"""What the sketch features cost in a training step, on this machine (issue 13 §5).

Times forward+backward (all parameters and the input) of the Flax attention
layer with each sketch, and of the learned sketch alone on q and on k, side by
side in one process (medians of --reps after a warm-up), and prints a table.

  JAX_PLATFORMS=cpu python bench/sketch_cost.py [--batch 32 --seq 128 --dim 64 --heads 2 --sketch-dim 16]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_polysketch.nn import PolySketchAttention
from pallas_polysketch.sketches import learned_sketch_features, learned_sketch_init


def _median_ms(fn, *args, reps):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--sketch-dim", type=int, default=16)
  p.add_argument("--block-size", type=int, default=32)
  p.add_argument("--sketch-hidden", type=int, nargs="+", default=[], metavar="N",
                 help="also time the learned sketch at these hidden widths (default 8r only)")
  p.add_argument("--reps", type=int, default=10)
  args = p.parse_args(argv)
  x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, args.dim))
  rows = []
  narrow = [(f"polysketch, learned sketch, hidden {h}", dict(sketch="learned", sketch_hidden_dim=h))
            for h in args.sketch_hidden]
  for name, kw in [("softmax", dict(attention="softmax")),
                   ("polysketch, learned sketch", dict(sketch="learned")), *narrow,
                   ("polysketch, random sketch", dict(sketch="random"))]:
    layer = PolySketchAttention(args.dim, args.heads, block_size=args.block_size,
                                sketch_dim=args.sketch_dim, rngs=nnx.Rngs(0), **kw)
    step = nnx.jit(lambda m, x: nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m))
    rows.append((f"layer fwd+bwd: {name}", _median_ms(step, layer, x, reps=args.reps)))
  head_dim = args.dim // args.heads
  qk = jax.random.normal(jax.random.key(2), (2, args.batch, args.seq, args.heads, head_dim))
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(learned_sketch_features(p, x[0]) ** 2)
                          + jnp.sum(learned_sketch_features(p, x[1]) ** 2), argnums=(0, 1)))
  for hidden in [None, *args.sketch_hidden]:
    params = learned_sketch_init(jax.random.key(1), head_dim, args.sketch_dim, hidden_dim=hidden)
    rows.append(("learned sketch alone, q and k, fwd+bwd" + (f", hidden {hidden}" if hidden else ""),
                 _median_ms(grad, params, qk, reps=args.reps)))
  print(f"batch {args.batch}, seq {args.seq}, width {args.dim}, {args.heads} heads, "
        f"sketch_dim {args.sketch_dim}, block {args.block_size}, f32; jax {jax.__version__}; "
        f"load average {os.getloadavg()[0]:.2f}")
  for name, ms in rows:
    print(f"  {name:55s} {ms:8.1f} ms")
  return rows


if __name__ == "__main__":
  main()
