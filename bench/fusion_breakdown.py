"""Where an XLA program's static cycles go on TPU, kernel by kernel, and which
unit bounds each (issue 13 §5: what the learned sketch's features cost).

Compiles one program for a TPU generation on this host (libtpu, as
`bench/tpu_schedule.py` does) and, per dumped kernel (XLA fusion or Pallas
kernel), reports its static cycles times the number of times the program
runs it, and its vector ops per cycle by issue-slot class
(`bundles.slot_counts`: VALU, MXU pushes, MXU result pops, EUP, XLU, vector
loads and stores). A kernel whose VALU ops per cycle are near the 4 slots of
a bundle is bound by its elementwise arithmetic; the program's VALU ops / 4
is then the cycles it needs at full VALU packing with XLA's op count.

Programs:
  features  the learned sketch's features of q and k as the Flax layer
            computes them (B=1, 12 heads, H=64, r=32 unless --head-dim and
            --sketch-dim say otherwise, bf16), forward + VJP
            into the params, q and k, the features returned too
            (`tpu_schedule._features_fn`); --implementation xla: XLA's fusions
            instead of the package's Pallas kernels

  python bench/fusion_breakdown.py --gen v6e --seq 4096 --tag fusion_breakdown_features_v6e
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bundles  # noqa: E402
import tpu_schedule  # noqa: E402

VALU_SLOTS = 4   # VALU slots a bundle on v5e and v6e
CLASSES = ("valu", "mxu", "mxu_result", "eup", "xlu", "load", "store")


def breakdown(rec: dict) -> dict:
  """{"total", "valu_floor", "kernels": [...]} of one worker record compiled
  with `slot_counts`; kernels sorted by cycles, largest first."""
  kernels = []
  for s in rec["schedules"]:
    if "format_error" in s:
      continue
    sched = bundles.Schedule.from_json(s)
    runs = tpu_schedule.runs(rec, sched.name)
    cycles = sched.static_cycles()
    slots = rec["slots"][sched.name]
    kernels.append(dict(name=sched.name, runs=runs, cycles=cycles * runs,
                        per_cycle={c: slots.get(c, 0) / max(cycles, 1) for c in CLASSES},
                        valu_ops=slots.get("valu", 0) * runs))
  return dict(total=sum(k["cycles"] for k in kernels),
              valu_floor=sum(k["valu_ops"] for k in kernels) / VALU_SLOTS,
              unparsed=[s["name"] for s in rec["schedules"] if "format_error" in s],
              kernels=sorted(kernels, key=lambda k: -k["cycles"]))


def markdown(doc: dict, top: int = 15, bound: float = 3.0) -> str:
  b = doc["breakdown"]
  heavy = sum(k["cycles"] for k in b["kernels"] if k["per_cycle"]["valu"] >= bound)
  lines = [f"# Static cycles by kernel: {doc['program']} on {doc['gen']}, T = {doc['T']} "
           f"(libtpu {doc['libtpu']})", "",
           f"`{doc['command']}`", "",
           f"Total {b['total'] / 1e6:.3f} Mcyc over {len(b['kernels'])} kernels; "
           f"{heavy / max(b['total'], 1):.0%} of it in kernels issuing >= {bound:g} VALU ops a "
           f"cycle (of {VALU_SLOTS}); the program's VALU ops / {VALU_SLOTS} = "
           f"{b['valu_floor'] / 1e6:.3f} Mcyc."
           + (f" Unparsed (not counted): {', '.join(b['unparsed'])}." if b["unparsed"] else ""),
           "", "| kernel | runs | Mcyc | share | " + " | ".join(CLASSES) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(CLASSES)]
  for k in b["kernels"][:top]:
    lines.append(f"| {k['name']} | {k['runs']} | {k['cycles'] / 1e6:.4f} | "
                 f"{k['cycles'] / max(b['total'], 1):.1%} | "
                 + " | ".join(f"{k['per_cycle'][c]:.2f}" for c in CLASSES) + " |")
  rest = b["kernels"][top:]
  if rest:
    lines.append(f"| {len(rest)} more | | {sum(k['cycles'] for k in rest) / 1e6:.4f} | "
                 f"{sum(k['cycles'] for k in rest) / max(b['total'], 1):.1%} |"
                 + " |" * len(CLASSES))
  lines += ["", "Columns after the share: vector ops a cycle by issue-slot class "
            "(`bundles.slot_counts`)."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gen", default="v6e", choices=sorted(tpu_schedule.TOPOLOGIES))
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--program", default="features", choices=("features",))
  p.add_argument("--head-dim", type=int, default=64, help="H (default 64)")
  p.add_argument("--sketch-dim", type=int, default=None, help="r (default H / 2)")
  p.add_argument("--sketch-hidden", type=int, default=None,
                 help="the learned sketch's hidden width (default 8r = 256, the paper's)")
  p.add_argument("--implementation", default=None, choices=("pallas", "xla"),
                 help="the learned sketch's (default: what the package runs on TPU, the "
                      "Pallas kernels; xla: XLA's fusions)")
  p.add_argument("--features-tile", type=int, default=None,
                 help="TileConfig.features_tile of the kernels (default: the generation's)")
  p.add_argument("--bf16-gelu", choices=("on", "off"), default=None,
                 help="TileConfig.bf16_gelu of the kernels (default: the generation's)")
  p.add_argument("--top", type=int, default=15)
  p.add_argument("--tag", default=None)
  args = p.parse_args(argv)
  ver = tpu_schedule.libtpu_version()
  if ver is None:
    print("libtpu is not installed: nothing to compile; skipping.")
    return 1
  head_dim = args.head_dim
  sketch_dim = args.sketch_dim or head_dim // 2
  job = dict(op="features", sketch="learned", mode="vjp", B=1, N=12, H=head_dim, r=sketch_dim, T=args.seq,
             slot_counts=True)
  if args.sketch_hidden is not None:
    job["hidden"] = args.sketch_hidden
  if args.implementation is not None:
    job["implementation"] = args.implementation
  if args.features_tile is not None:
    job["features_tile"] = args.features_tile
  if args.bf16_gelu is not None:
    job["bf16_gelu"] = args.bf16_gelu == "on"
  hidden = job.get("hidden", 8 * job["r"])
  rec = tpu_schedule.run_jobs(args.gen, [job])[0]
  if "error" in rec:
    print(f"compile failed: {rec['error']}")
    return 1
  tag = args.tag or f"fusion_breakdown_{args.program}_{args.gen}_{args.seq}"
  impl = args.implementation or "pallas"
  doc = dict(program=f"learned sketch features of q and k, fwd + VJP (12 heads, H={head_dim}, r={sketch_dim}, "
                     f"hidden {hidden}, bf16, {impl})", hidden=hidden, implementation=impl, gen=args.gen, T=args.seq, libtpu=ver,
             command="python bench/fusion_breakdown.py " + " ".join(argv or sys.argv[1:]),
             breakdown=breakdown(rec))
  stem = os.path.join(tpu_schedule.RESULTS, tag)
  with open(stem + ".json", "w") as f:
    json.dump(doc, f, indent=1)
  md = markdown(doc, top=args.top)
  with open(stem + ".md", "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
