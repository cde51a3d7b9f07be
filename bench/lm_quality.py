"""LM quality: softmax vs exact polynomial vs PolySketch on character-level text.

Trains the same GPT (same data order, steps and schedule) with each attention
variant and each seed (--seeds: the model's initial key and the data order)
and writes, under --out-dir (stem --tag, default lm_quality_ctx{T}):

  <stem>.json   every run: val loss, params, steps/s, tokens/s, histories
  <stem>.md     per variant over the seeds: mean val loss, spread, parameters,
                step time; then every run
  <stem>.png    validation loss curves (mean over seeds, min-max band)

  JAX_PLATFORMS=cpu python bench/lm_quality.py --context 512 --steps 300
  JAX_PLATFORMS=cpu python bench/lm_quality.py --context 1024 --seeds 0 1 2 \
      --variants softmax,learned+local,random+local,softmax-wide --wide-dim 160

Each run is written as soon as it finishes, so a cut-short run keeps what it
has; --resume skips the runs already in the JSON. --variants picks a subset
(names below); "softmax-wide" is softmax at --wide-dim (e.g. the width that
gives it the learned sketch's extra parameters).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from pallas_polysketch.models.gpt import GPTConfig
from pallas_polysketch.train import TextData, TrainConfig, train

# name -> (attention, sketch, local_exact)
VARIANTS = {
    "softmax": ("softmax", "learned", True),
    "polynomial": ("polynomial", "learned", True),
    "learned+local": ("polysketch", "learned", True),
    "random+local": ("polysketch", "random", True),
    "learned": ("polysketch", "learned", False),
    "random": ("polysketch", "random", False),
    "local": ("polysketch", "none", True),    # exact local blocks alone: what the sketch adds
    "softmax-wide": ("softmax", "learned", True),  # at --wide-dim
}
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                            "shared", "data", "tinyshakespeare.txt")


def summarise(runs):
  """Per variant (in first-seen order): mean, std and range of the final val loss over seeds."""
  out = {}
  for r in runs:
    out.setdefault(r["variant"], []).append(r)
  rows = []
  for name, rs in out.items():
    vals = np.array([r["val_loss"] for r in rs])
    rows.append(dict(variant=name, seeds=[r["seed"] for r in rs], n=len(rs),
                     mean=float(vals.mean()), std=float(vals.std(ddof=1)) if len(rs) > 1 else 0.0,
                     lo=float(vals.min()), hi=float(vals.max()), params=rs[0]["params"],
                     embed_dim=rs[0]["embed_dim"],
                     step_ms=float(np.median([1e3 / r["steps_per_s"] for r in rs])),
                     tokens_per_s=float(np.median([r["tokens_per_s"] for r in rs])),
                     attention=rs[0]["attention"], sketch=rs[0]["sketch"],
                     local_exact=rs[0]["local_exact"]))
  return rows


def write_table(path, runs, header):
  rows = summarise(runs)
  soft = next((r["mean"] for r in rows if r["variant"] == "softmax"), None)
  lines = [header, "",
           "| variant | attention | sketch | local_exact | width | params | seeds | mean val loss "
           "| std | min .. max | vs softmax mean | ms/step | tokens/s |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
  for r in rows:
    rel = f"{100 * (r['mean'] / soft - 1):+.2f}%" if soft else "n/a"
    sk = r["sketch"] if r["attention"] == "polysketch" else "-"
    le = str(r["local_exact"]) if r["attention"] == "polysketch" else "-"
    lines.append(f"| {r['variant']} | {r['attention']} | {sk} | {le} | {r['embed_dim']} | "
                 f"{r['params']:,} | {r['n']} | {r['mean']:.4f} | {r['std']:.4f} | "
                 f"{r['lo']:.4f} .. {r['hi']:.4f} | {rel} | {r['step_ms']:.0f} | "
                 f"{r['tokens_per_s']:,.0f} |")
  lines += ["", "Every run:", "", "| variant | seed | val loss | steps/s | wall s |",
            "|---|---:|---:|---:|---:|"]
  for r in runs:
    lines.append(f"| {r['variant']} | {r['seed']} | {r['val_loss']:.4f} | "
                 f"{r['steps_per_s']:.3f} | {r['wall_s']:.0f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(path, runs, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  by = {}
  for r in runs:
    by.setdefault(r["variant"], []).append(r)
  for i, (name, rs) in enumerate(by.items()):
    color = f"C{i}"
    for j, r in enumerate(rs):
      h = r["history"]
      axes[0].plot(h["step"], h["train_loss"], color=color, alpha=0.7, lw=1,
                   label=name if j == 0 else None)
    steps = rs[0]["history"]["val_step"]
    curves = np.array([r["history"]["val_loss"][:len(steps)] for r in rs
                       if len(r["history"]["val_loss"]) >= len(steps)])
    axes[1].plot(steps, curves.mean(0), marker="o", color=color, label=f"{name} (n={len(curves)})")
    if len(curves) > 1:
      axes[1].fill_between(steps, curves.min(0), curves.max(0), color=color, alpha=0.2)
  axes[0].set_title("train loss (mean over log window), every seed")
  axes[1].set_title("validation loss: mean over seeds, min-max band")
  for ax in axes:
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=DEFAULT_DATA)
  p.add_argument("--context", type=int, default=512)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--wide-dim", type=int, default=None, help="width of the softmax-wide variant")
  p.add_argument("--sketch-dim", type=int, default=32)
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "softmax-wide"))
  p.add_argument("--tag", default=None, help="output stem (default lm_quality_ctx<context>)")
  p.add_argument("--resume", action="store_true", help="skip the runs already in <stem>.json")
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args(argv)
  variants = args.variants.split(",")
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
  if "softmax-wide" in variants and args.wide_dim is None:
    p.error("--variants softmax-wide needs --wide-dim")
  if not os.path.exists(args.data):
    print(f"skipped: no data at {args.data} (pass --data PATH to a text file)")
    return []

  data = TextData.from_file(args.data)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, args.tag or f"lm_quality_ctx{args.context}")
  command = " ".join(["python", "bench/lm_quality.py"]
                     + (argv if argv is not None else sys.argv[1:]))
  runs = []
  if args.resume and os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      runs = json.load(f)["results"]
  done = {(r["variant"], r["seed"]) for r in runs}
  header = (f"Context {args.context}, {args.layers} layers x {args.heads} heads x {args.dim} dims"
            + (f" (softmax-wide: {args.wide_dim})" if "softmax-wide" in variants else "")
            + f", sketch_dim {args.sketch_dim}, block {args.block_size}, batch {args.batch_size}, "
            f"{args.steps} steps ({args.steps * args.batch_size * args.context:,} tokens), "
            f"lr {args.lr}, seeds {args.seeds}; val loss on "
            f"{args.eval_batches * args.batch_size * args.context:,} held-out chars. "
            f"Command: `{command}`")
  for seed in args.seeds:
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, context=args.context,
                      learning_rate=args.lr, warmup_steps=args.warmup, seed=seed,
                      eval_every=args.eval_every, eval_batches=args.eval_batches,
                      log_every=10)
    for name in variants:
      if (name, seed) in done:
        continue
      attention, sketch, local_exact = VARIANTS[name]
      dim = args.wide_dim if name == "softmax-wide" else args.dim
      mc = GPTConfig(vocab_size=data.vocab_size, num_layers=args.layers, num_heads=args.heads,
                     embed_dim=dim, attention=attention, sketch=sketch,
                     sketch_dim=args.sketch_dim, block_size=args.block_size,
                     local_exact=local_exact)
      print(f"=== {name} seed {seed} ===", flush=True)
      t0 = time.time()
      load_before = os.getloadavg()
      _, res = train(mc, data, cfg, progress=False, log=lambda s: print(s, flush=True))
      res.update(variant=name, seed=seed, attention=attention, sketch=sketch,
                 local_exact=local_exact, embed_dim=dim, wall_s=time.time() - t0,
                 load_before=load_before, load_after=os.getloadavg())
      runs.append(res)
      print(f"{name} seed {seed}: val {res['val_loss']:.4f}  {res['steps_per_s']:.3f} steps/s  "
            f"({res['wall_s']:.0f} s)", flush=True)
      meta = {"command": command, "args": vars(args),
              "model": dataclasses.asdict(mc) | {"attention": "*", "sketch": "*",
                                                 "local_exact": "*", "embed_dim": "*"},
              "train": dataclasses.asdict(cfg) | {"seed": "*"},
              "data": os.path.basename(args.data), "platform": sys.platform,
              "summary": summarise(runs), "results": runs}
      with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=1)
      write_table(stem + ".md", runs, header)
      plot(stem + ".png", runs, f"{os.path.basename(args.data)}, context {args.context}, "
           f"{args.layers}L/{args.heads}H/{args.dim}d, {args.steps} steps, seeds {args.seeds}")
  return runs


if __name__ == "__main__":
  main()
