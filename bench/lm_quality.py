"""LM quality: softmax vs exact polynomial vs PolySketch on character-level text.

Trains the same GPT (same seed, data order, steps and schedule) with each
attention variant and writes, under --out-dir:

  lm_quality_ctx{T}.json   per-variant val loss, steps/s, tokens/s, histories
  lm_quality_ctx{T}.md     the results table (markdown)
  lm_quality_ctx{T}.png    train and validation loss curves

  JAX_PLATFORMS=cpu python bench/lm_quality.py --context 512 --steps 300

Each variant is written as soon as it finishes, so a cut-short run keeps what
it has. --variants picks a subset (names below).
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
}
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                            "shared", "data", "tinyshakespeare.txt")


def write_table(path, rows, header):
  soft = next((r["val_loss"] for r in rows if r["variant"] == "softmax"), None)
  lines = [header, "",
           "| variant | attention | sketch | local_exact | val loss | vs softmax | steps/s | tokens/s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    rel = f"{100 * (r['val_loss'] / soft - 1):+.2f}%" if soft else "n/a"
    sk = r["sketch"] if r["attention"] == "polysketch" else "-"
    le = str(r["local_exact"]) if r["attention"] == "polysketch" else "-"
    lines.append(f"| {r['variant']} | {r['attention']} | {sk} | {le} | {r['val_loss']:.4f} | "
                 f"{rel} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:,.0f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(path, rows, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in rows:
    h = r["history"]
    axes[0].plot(h["step"], h["train_loss"], label=r["variant"])
    axes[1].plot(h["val_step"], h["val_loss"], marker="o", label=r["variant"])
  axes[0].set_title("train loss (mean over log window)")
  axes[1].set_title("validation loss")
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
  p.add_argument("--sketch-dim", type=int, default=32)
  p.add_argument("--block-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args(argv)

  data = TextData.from_file(args.data)
  cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, context=args.context,
                    learning_rate=args.lr, warmup_steps=args.warmup, seed=args.seed,
                    eval_every=args.eval_every, eval_batches=args.eval_batches,
                    log_every=10)
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"lm_quality_ctx{args.context}")
  rows = []
  for name in args.variants.split(","):
    attention, sketch, local_exact = VARIANTS[name]
    mc = GPTConfig(vocab_size=data.vocab_size, num_layers=args.layers, num_heads=args.heads,
                   embed_dim=args.dim, attention=attention, sketch=sketch,
                   sketch_dim=args.sketch_dim, block_size=args.block_size,
                   local_exact=local_exact)
    print(f"=== {name} ===", flush=True)
    t0 = time.time()
    _, res = train(mc, data, cfg, progress=False, log=lambda s: print(s, flush=True))
    res.update(variant=name, attention=attention, sketch=sketch, local_exact=local_exact,
               wall_s=time.time() - t0)
    rows.append(res)
    print(f"{name}: val {res['val_loss']:.4f}  {res['steps_per_s']:.3f} steps/s  "
          f"({res['wall_s']:.0f} s)", flush=True)
    meta = {"model": dataclasses.asdict(mc) | {"attention": "*", "sketch": "*", "local_exact": "*"},
            "train": dataclasses.asdict(cfg), "data": os.path.basename(args.data),
            "platform": sys.platform, "results": rows}
    with open(stem + ".json", "w") as f:
      json.dump(meta, f, indent=1)
    header = (f"Context {args.context}, {args.layers} layers x {args.heads} heads x {args.dim} dims, "
              f"sketch_dim {args.sketch_dim}, block {args.block_size}, batch {args.batch_size}, "
              f"{args.steps} steps, lr {args.lr}, seed {args.seed}; val loss on "
              f"{args.eval_batches * args.batch_size * args.context:,} held-out chars.")
    write_table(stem + ".md", rows, header)
    plot(stem + ".png", rows, f"{os.path.basename(args.data)}, context {args.context}, "
         f"{args.layers}L/{args.heads}H/{args.dim}d, {args.steps} steps")
  return rows


if __name__ == "__main__":
  main()
