"""bf16 gradient error of the Pallas kernels (interpret mode) and the xla path
against a float64 reference, at layer magnitudes (issue 11).

  JAX_PLATFORMS=cpu python bench/bf16_gradients.py [--v-mean 1.0 --v-spread 0.5]

LayerNorm'd q, k (so (q.k)^4 reaches H^4), degree-4 random-sketch features,
v = v_mean + v_spread * N(0, 1): with a mean, O is close to the mean of v and
the backward's S^T dnum + z dden cancels. B=1, T=1024, 2 heads, H=64, r=16,
block 128. Prints max |error| / max |reference| per gradient.
"""
import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_polysketch as ps  # noqa: E402
from pallas_polysketch import ref  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--v-mean", type=float, default=1.0)
  parser.add_argument("--v-spread", type=float, default=0.5)
  parser.add_argument("--paths", default="pallas,xla")
  args = parser.parse_args(argv)
  ln = lambda x: (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
  ks = jax.random.split(jax.random.key(0), 6)
  b, t, n, h, r = 1, 1024, 2, 64, 16
  q, k = ln(jax.random.normal(ks[0], (b, t, n, h))), ln(jax.random.normal(ks[1], (b, t, n, h)))
  v = args.v_mean + args.v_spread * jax.random.normal(ks[2], (b, t, n, h))
  sketch = ps.random_sketch_init(ks[3], h, r, 4)
  fq, fk = ps.random_sketch_features(sketch, q), ps.random_sketch_features(sketch, k)
  inputs = tuple(x.astype(jnp.bfloat16) for x in (q, k, v, fq, fk))
  cot = jax.random.normal(ks[5], (b, t, n, h))
  with jax.enable_x64(True):
    x64 = tuple(jnp.asarray(np.asarray(x, np.float64)) for x in inputs)
    c64 = jnp.asarray(np.asarray(cot, np.float64))
    want = jax.grad(lambda *a: jnp.sum(ref.polysketch_attention_quadratic(*a, block_size=128)
                                       * c64), argnums=tuple(range(5)))(*x64)
    want = [np.asarray(w) for w in want]
  for path in args.paths.split(","):
    fn = lambda *a: ps.polysketch_attention(*a, block_size=128, implementation=path,
                                            interpret=True)
    got = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cot),
                   argnums=tuple(range(5)))(*inputs)
    errs = [float(np.max(np.abs(np.asarray(g, np.float64) - w)) / np.max(np.abs(w)))
            for g, w in zip(got, want)]
    print(path, " ".join(f"d{name} {e:.1e}" for name, e in zip(("q", "k", "v", "fq", "fk"), errs)))


if __name__ == "__main__":
  main(sys.argv[1:])
