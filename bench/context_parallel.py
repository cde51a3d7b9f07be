"""Sequence (context) parallelism: communication and step time (issue 12).

  JAX_PLATFORMS=cpu python bench/context_parallel.py [--seq 8192] [--tag cpu]

Writes bench/results/context_parallel-<tag>.{json,md}:
1. the modelled bytes each device receives per attention layer, fwd, for the
   prefix-state exchange (the op's log-depth ppermute scan: 1 + ceil(log2 D)
   float32 states of r^2 (H + 1) per kv head; an all-gather would bring D - 1)
   against ring attention's all-gather of K and V (bf16), for GPT-2-small
   heads at 32k..1M tokens on 8..256 devices;
   With packed segments each device also receives the previous shard's last
   block of K, V and f_k and the segment-running transition (a state and a
   flag per row), plus one int per row and device for the segment starts;
2. on this CPU with 8 fake devices (XLA_FLAGS, set here): fwd+bwd time of the
   sequence-sharded op against one device, unpacked and packed (documents of
   random lengths that span shards), and the bytes of every collective in the
   compiled program (read from its HLO). A correctness-scale figure: the 8
   "devices" share 2 cores, so the time says nothing about real speed-up.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import pallas_polysketch as ps  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, SKETCH_DIM = 12, 12, 64, 32
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def modelled_traffic(seqs=(32768, 131072, 524288, 1048576), devices=(8, 64, 256),
                     block=256):
  """Bytes received per device and layer (batch 1), forward."""
  state = KV_HEADS * SKETCH_DIM ** 2 * (HEAD_DIM + 1) * 4       # float32 per device
  rows = []
  for t in seqs:
    for d in devices:
      ring = (d - 1) / d * t * KV_HEADS * HEAD_DIM * 2 * 2      # K and V, bf16
      rounds = 1 + math.ceil(math.log2(d))
      scan = rounds * state
      # packed: the transition (state + flag) per round, the last block of
      # K, V, f_k (bf16) and its labels, the segment-start ints of every device
      packed = rounds * (state + 4) + block * KV_HEADS * (2 * HEAD_DIM + SKETCH_DIM) * 2 \
          + 2 * block * 4 + 4 + d * 4
      rows.append(dict(seq=t, devices=d, state_bytes=scan, all_gather_bytes=(d - 1) * state,
                       packed_bytes=packed, ring_kv_bytes=int(ring), ratio=ring / scan))
  return rows


def _time(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _packed_ids(seq, seed=0):
  """Documents of random lengths (mean 1000 tokens): most span shards."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 2000, size=seq)
  ids = np.repeat(np.arange(seq), lengths)[:seq]
  return jnp.asarray(ids[None].astype(np.int32))


def measured(seq, block, packed=False):
  mesh = Mesh(np.array(jax.devices()[:8]), ("seq",))
  ks = jax.random.split(jax.random.key(0), 5)
  shapes = [(1, seq, HEADS, HEAD_DIM)] + [(1, seq, KV_HEADS, HEAD_DIM)] * 2 + [
      (1, seq, HEADS, SKETCH_DIM), (1, seq, KV_HEADS, SKETCH_DIM)]
  args = [jax.random.normal(k, s) / (8.0 if i < 2 else 1.0)
          for i, (k, s) in enumerate(zip(ks, shapes))]
  kw = dict(block_size=block, implementation="xla")
  ids = _packed_ids(seq) if packed else None
  op = ps.sharded_polysketch_attention(mesh, seq_axis="seq", **kw)
  sharded = lambda *a: op(*a[:5], segment_ids=a[5] if packed else None)
  single = lambda *a: ps.polysketch_attention(*a[:5], segment_ids=a[5] if packed else None, **kw)
  grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=tuple(range(5))))
  sharding = NamedSharding(mesh, P(None, "seq", None, None))
  sharded_args = [jax.device_put(x, sharding) for x in args]
  if packed:
    args = args + [ids]
    sharded_args = sharded_args + [jax.device_put(ids, NamedSharding(mesh, P(None, "seq")))]
  text = grad(sharded).lower(*sharded_args).compile().as_text()
  collectives = []
  for line in text.splitlines():
    m = re.search(r"= (\w+)\[([0-9,]*)\]\S* (all-gather|all-reduce|reduce-scatter|"
                  r"collective-permute|all-to-all)(-start)?\(", line)
    if m:
      dims = [int(x) for x in m.group(2).split(",") if x]
      item = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f64": 8}[m.group(1)]
      collectives.append(dict(op=m.group(3), shape=dims, bytes=int(np.prod(dims)) * item))
  return dict(
      seq=seq, block_size=block, devices=8, packed=packed,
      documents=int(len(np.unique(np.asarray(ids)))) if packed else 1,
      single_device_s=_time(grad(single), *args),
      sharded_8_s=_time(grad(sharded), *sharded_args),
      collectives=collectives,
      collective_bytes=sum(c["bytes"] for c in collectives),
      qkv_bytes=sum(int(np.prod(s)) * 4 for s in shapes[:3]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq", type=int, default=8192)
  parser.add_argument("--block", type=int, default=256)
  parser.add_argument("--tag", default="cpu")
  args = parser.parse_args(argv)
  load_before = os.getloadavg()
  result = dict(
      command=" ".join(["python", "bench/context_parallel.py"] + (argv or sys.argv[1:])),
      jax=jax.__version__, load_before=load_before,
      shape=dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, sketch_dim=SKETCH_DIM),
      modelled=modelled_traffic(block=args.block), measured=measured(args.seq, args.block),
      measured_packed=measured(args.seq, args.block, packed=True))
  result["load_after"] = os.getloadavg()
  os.makedirs(RESULTS, exist_ok=True)
  base = os.path.join(RESULTS, f"context_parallel-{args.tag}")
  with open(base + ".json", "w") as f:
    json.dump(result, f, indent=1)
  m = result["measured"]
  lines = [
      f"# Context parallelism ({result['command']})", "",
      f"jax {result['jax']}; load average before {load_before[0]:.2f}, "
      f"after {result['load_after'][0]:.2f}", "",
      "## Modelled bytes received per device and layer (fwd, batch 1, GPT-2-small heads)", "",
      "| tokens | devices | prefix states, ppermute scan (f32) | (all-gather instead) "
      "| packed segments | ring attention K, V (bf16) | ring / scan |",
      "|---:|---:|---:|---:|---:|---:|---:|"]
  for r in result["modelled"]:
    lines.append(f"| {r['seq']} | {r['devices']} | {r['state_bytes'] / 2**20:.1f} MiB | "
                 f"{r['all_gather_bytes'] / 2**20:.1f} MiB | {r['packed_bytes'] / 2**20:.1f} MiB | "
                 f"{r['ring_kv_bytes'] / 2**20:.1f} MiB | {r['ratio']:.1f}x |")
  for m in (result["measured"], result["measured_packed"]):
    what = f"packed ({m['documents']} documents)" if m["packed"] else "one sequence per row"
    lines += ["", f"## Measured on this CPU, 8 fake devices, T={m['seq']}, fwd+bwd, f32 "
              f"(xla path), {what}", "",
              f"- one device: {m['single_device_s']:.2f} s; sequence sharded over 8: "
              f"{m['sharded_8_s']:.2f} s (2 shared cores: a correctness-scale figure)",
              f"- collectives in the compiled program: {len(m['collectives'])}, "
              f"{m['collective_bytes'] / 2**20:.2f} MiB in all (their output arrays), against "
              f"{m['qkv_bytes'] / 2**20:.1f} MiB of q, k, v",
              "- shapes: " + ", ".join(f"{c['op']} {c['shape']}" for c in m["collectives"])]
  with open(base + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
