"""The least VMEM limit each PolySketch kernel compiles under, per TPU generation.

For every (head_dim H, sketch_dim r, block_size b, query heads per kv head G)
the forward, dq and dkv kernels are compiled by libtpu on this CPU (a
`get_topology_desc` device, no TPU needed) with that kernel's
`vmem_limit_bytes` forced to a trial value and the others left large; a
bisection finds the least limit (to 1/4 MiB) it compiles under. This is what
`tpu_config.vmem_estimates` is fitted to as an upper bound; the table shows
each estimate beside the measured need.

  python bench/vmem_limits.py --gens v4 v5e v6e        # -> bench/results/vmem_limits.{json,md}
  python bench/vmem_limits.py --kernels dq dkv         # after a backward change: the forward's
                                                       # needs kept from the existing JSON

About a minute per (generation, shape) on 2 CPU cores. Needs libtpu (the `tpu` extra).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp

import pallas_polysketch as ps
from pallas_polysketch import tpu_config

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
MiB = 1 << 20
KERNELS = ("forward", "dq", "dkv")
# Blocks compiled: the most any default grid step walks (`tpu_config.GENERATIONS`).
BLOCKS = 8
# (H, r, b, G)
SHAPES = [(64, 16, 256, 1), (64, 32, 256, 1), (128, 32, 256, 1), (64, 64, 256, 1),
          (128, 64, 256, 1), (128, 64, 128, 1), (64, 32, 512, 1), (64, 32, 256, 4),
          (128, 64, 256, 2)]



def _limited(kernel: str, limit: int):
  """tpu_config.resolve_tiles with `kernel`'s VMEM limit forced to `limit` bytes
  (the others 120 MiB) and the estimate check switched off."""
  real_resolve, real_estimates = tpu_config.resolve_tiles, tpu_config.vmem_estimates

  def resolve(*args, **kwargs):
    tpu_config.vmem_estimates = lambda *a, **k: dict.fromkeys(KERNELS, 1)
    try:
      tiles = real_resolve(*args, **kwargs)
    finally:
      tpu_config.vmem_estimates = real_estimates
    pick = lambda name: limit if name == kernel else 120 * MiB
    return dataclasses.replace(
        tiles, vmem_limit_bytes=pick("forward"), backward_vmem_limit_bytes=120 * MiB,
        dq_vmem_limit_bytes=pick("dq"), dkv_vmem_limit_bytes=pick("dkv"))
  return resolve


def compiles(gen, kernel, limit, h, r, b, g) -> bool:
  from jax.experimental import topologies
  device = topologies.get_topology_desc(TOPOLOGIES[gen], "tpu").devices[0]
  kv = 4
  sds = lambda heads, d: jax.ShapeDtypeStruct((1, BLOCKS * b, heads, d), jnp.bfloat16,
                                              sharding=jax.sharding.make_single_device_sharding(device))
  args = [sds(kv * g, h), sds(kv, h), sds(kv, h), sds(kv * g, r), sds(kv, r)]
  attend = functools.partial(ps.polysketch_attention, block_size=b, implementation="pallas",
                             tile_config=tpu_config.TileConfig(generation=gen))
  if kernel == "forward":
    fn = attend
  else:
    fn = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4))
  real = tpu_config.resolve_tiles
  tpu_config.resolve_tiles = _limited(kernel, limit)
  try:
    jax.jit(fn).lower(*args).compile()
    return True
  except Exception as e:  # noqa: BLE001  (libtpu raises XlaRuntimeError)
    if "vmem" not in str(e).lower():
      raise
    return False
  finally:
    tpu_config.resolve_tiles = real


def least_limit(gen, kernel, h, r, b, g, lo=0.5, hi=64.0, step=0.25) -> float:
  """MiB: the least limit (to `step`) the kernel compiles under; lo must fail."""
  if not compiles(gen, kernel, int(hi * MiB), h, r, b, g):
    raise RuntimeError(f"{gen} {kernel} {(h, r, b, g)} does not compile under {hi} MiB")
  while hi - lo > step:
    mid = (lo + hi) / 2
    if compiles(gen, kernel, int(mid * MiB), h, r, b, g):
      hi = mid
    else:
      lo = mid
  return hi


def estimates_mib(gen, h, r, b, g):
  generation = tpu_config.get_generation(gen)
  lt = min(generation.mxu_width, b)
  # `compiles` runs BLOCKS blocks, so a kernel's grid step holds min(BLOCKS, its default).
  est = tpu_config.vmem_estimates(
      b, h, r, jnp.bfloat16, jnp.bfloat16, group=g, local_tile=lt,
      blocks_per_step=min(BLOCKS, generation.forward_blocks_per_step),
      dq_blocks_per_step=min(BLOCKS, generation.dq_blocks_per_step),
      dkv_blocks_per_step=min(BLOCKS, generation.dkv_blocks_per_step))
  return {k: est[k] / MiB for k in KERNELS}


def markdown(records) -> str:
  lines = ["# Least VMEM limit each kernel compiles under (libtpu), against "
           "`tpu_config.vmem_estimates`", "",
           "bf16, MiB; estimate / need in brackets.", "",
           "| gen | H | r | b | G | forward | dq | dkv |", "|---|---:|---:|---:|---:|---|---|---|"]
  for rec in records:
    h, r, b, g = rec["shape"]
    est = estimates_mib(rec["gen"], h, r, b, g)
    cells = [f"{rec['need_mib'][k]:.2f} ({est[k] / rec['need_mib'][k]:.2f}x)" for k in KERNELS]
    lines.append(f"| {rec['gen']} | {h} | {r} | {b} | {g} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gens", nargs="+", default=["v4", "v5e", "v6e"], choices=list(TOPOLOGIES))
  p.add_argument("--shapes", nargs="+", default=None, metavar="H,r,b,G",
                 help="default: " + " ".join(",".join(map(str, s)) for s in SHAPES))
  p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS,
                 help="bisect these; the others' needs are kept from --out's JSON")
  p.add_argument("--out", default=os.path.join(RESULTS, "vmem_limits"))
  args = p.parse_args(argv)
  shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split(","))) for s in args.shapes]
  earlier = []   # --out's records of other (gen, shape)s stay in it
  if os.path.exists(args.out + ".json"):
    with open(args.out + ".json") as f:
      earlier = json.load(f)["records"]
  kept = {(r["gen"], tuple(r["shape"])): r["need_mib"] for r in earlier}
  if set(args.kernels) != set(KERNELS):
    missing = [(gen, s) for gen in args.gens for s in shapes if (gen, tuple(s)) not in kept]
    if missing:
      p.error(f"--kernels {' '.join(args.kernels)}: no earlier record in {args.out}.json "
              f"for {missing}")
  from importlib.metadata import version
  records = []
  for gen in args.gens:
    for h, r, b, g in shapes:
      need = {k: (least_limit(gen, k, h, r, b, g) if k in args.kernels
                  else kept[(gen, (h, r, b, g))][k]) for k in KERNELS}
      records.append(dict(gen=gen, shape=[h, r, b, g], need_mib=need))
      est = estimates_mib(gen, h, r, b, g)
      print(gen, (h, r, b, g), "need MiB", need, "estimate",
            {k: round(v, 2) for k, v in est.items()}, flush=True)
      done = {(r["gen"], tuple(r["shape"])) for r in records}
      others = [r for r in earlier if (r["gen"], tuple(r["shape"])) not in done]
      with open(args.out + ".json", "w") as f:
        json.dump(dict(command="python bench/vmem_limits.py " + " ".join(argv or sys.argv[1:]),
                       libtpu=version("libtpu"), records=others + records), f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(markdown(others + records))
  return records


if __name__ == "__main__":
  main()
