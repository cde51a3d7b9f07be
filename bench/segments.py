"""Cost of packed segments: the segmented xla path against the unsegmented one.

One process, one shape, both paths compiled first, then timed alternately
(round-robin, so both see the same machine load), median of --repeats calls
ending in `block_until_ready`. The segment layout does not change the work
(the walk is the same for any ids); the run uses a few documents of awkward
lengths. Prints a table and the 1-minute load average before and after, and
writes JSON.

  JAX_PLATFORMS=cpu python bench/segments.py                 # T=4096, B=1, 12 heads, H=64, r=32
  JAX_PLATFORMS=cpu python bench/segments.py --seq 1024 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_polysketch as ps


def _inputs(batch, seq, heads, head_dim, sketch_dim):
  ks = jax.random.split(jax.random.key(0), 5)
  norm = lambda x: (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
  q, k, v = (norm(jax.random.normal(key, (batch, seq, heads, head_dim))) for key in ks[:3])
  sketch = ps.random_sketch_init(ks[3], head_dim, sketch_dim, 4)
  fq, fk = ps.random_sketch_features(sketch, q), ps.random_sketch_features(sketch, k)
  cot = jax.random.normal(ks[4], q.shape)
  return (q, k, v, fq, fk), cot


def _documents(batch, seq):
  """Documents of lengths seq/3 + 17, seq/5 - 3, ... (starting mid-block)."""
  bounds = np.cumsum([seq // 3 + 17, seq // 5 - 3, seq // 7 + 5, seq // 11 + 1])
  ids = np.searchsorted(bounds, np.arange(seq), side="right").astype(np.int32)
  return jnp.asarray(np.broadcast_to(ids, (batch, seq)))


def build(mode, segment_ids, cot, **kw):
  def fwd(*a):
    return ps.polysketch_attention(*a, segment_ids=segment_ids, implementation="xla", **kw)
  if mode == "fwd":
    return jax.jit(fwd)
  loss = lambda *a: jnp.sum(fwd(*a) * cot)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--sketch-dim", type=int, default=32)
  p.add_argument("--block-size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default=None, help="JSON output (default: print only)")
  args = p.parse_args(argv)
  inputs, cot = _inputs(args.batch, args.seq, args.heads, args.head_dim, args.sketch_dim)
  ids = _documents(args.batch, args.seq)
  kw = dict(block_size=args.block_size)
  load_before = os.getloadavg()
  results = {}
  for mode in ("fwd", "fwd+bwd"):
    fns = {"unsegmented": build(mode, None, cot, **kw),
           "segmented": build(mode, ids, cot, **kw)}
    compile_s, temp_gib = {}, {}
    for name, fn in fns.items():
      mem = fn.lower(*inputs).compile().memory_analysis()
      temp_gib[name] = mem.temp_size_in_bytes / 2 ** 30 if mem is not None else None
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*inputs))           # compile + warm-up
      jax.block_until_ready(fn(*inputs))
      compile_s[name] = time.perf_counter() - t0
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
      for name, fn in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    results[mode] = {"median_s": med, "times_s": times, "first_two_calls_s": compile_s,
                     "temp_gib": temp_gib, "ratio": med["segmented"] / med["unsegmented"]}
    gib = lambda x: "?" if x is None else f"{x:.2f}"
    print(f"{mode:8s} unsegmented {med['unsegmented'] * 1e3:8.1f} ms ({gib(temp_gib['unsegmented'])} "
          f"GiB temp)   segmented {med['segmented'] * 1e3:8.1f} ms ({gib(temp_gib['segmented'])} "
          f"GiB temp)   ratio {results[mode]['ratio']:.2f}")
  load_after = os.getloadavg()
  print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; "
        f"{os.cpu_count()} CPUs")
  record = {"shape": vars(args), "num_segments": int(len(np.unique(np.asarray(ids[0])))),
            "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "jax": jax.__version__, "load_before": load_before, "load_after": load_after,
            "results": results}
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
  return record


if __name__ == "__main__":
  main()
