"""How much attention weight a query puts on the one key that matches it (issue 14 §1).

Associative recall (bench/recall.py) asks a head to find the one earlier key
equal to its query among N other positions. A kernel k(q, k_j) >= 0 gives the
match the share w_match / (w_match + sum over the N others). This script
measures that share, without training, for the kernels the recall benchmark
compares:

  softmax      exp(q . k / sqrt(H))
  polynomial   (q . k)^4, the exact kernel PolySketch approximates
  gaussian     <f(q), f(k)>^2 with the random Gaussian sketch f (`random_sketch_init`)
  hadamard     the same with the SRHT-style sketch of the official code
  learned      the learned sketch at its initialisation (before any training)

q and the N + 1 keys are independent Gaussian vectors scaled to norm sqrt(H)
(what a LayerNorm gives), the first key equal to q. The sketches' noise on the
N near-orthogonal keys adds up: a random sketch gives each of them a weight of
about c / r times the match's, so the share is about r / (r + c N) (the
fitted c is reported), while the exact polynomial's shrinks only as
H^2 / (H^2 + 3 N) (E (q . k)^4 = 3 H^2 for independent keys).

A second table puts each sketch's weights on the exact polynomial's scale,
which is what the exact local blocks of PolySketch + local use beside the
sketched prefix: the mean weight on an independent key and the weight on the
matching key, each over the exact kernel's (3 H^2 and H^4). A prefix key's
weight enters the same sum as a local key's, so a ratio far below 1 means
the prefix carries little of a query's attention, whatever it matches.

  JAX_PLATFORMS=cpu python bench/retrieval_share.py     # bench/results/retrieval_share.{json,md}, ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_polysketch import sketches

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
KINDS = ("softmax", "polynomial", "gaussian", "hadamard", "learned")
SKETCHED = ("gaussian", "hadamard", "learned")


def make_features(kind: str, head_dim: int, sketch_dim: int, key: jax.Array):
  """x [..., H] -> features [..., F] with weight(q, k) = (feat(q) . feat(k))^2,
  for the sketched kinds."""
  if kind in ("gaussian", "hadamard"):
    params = sketches.random_sketch_init(key, head_dim, sketch_dim, 4, sketch_type=kind)
    return lambda x: sketches.random_sketch_features(params, x)
  if kind == "learned":
    params = sketches.learned_sketch_init(key, head_dim, sketch_dim)
    return lambda x: sketches.learned_sketch_features(params, x)
  raise ValueError(f"kind must be one of {SKETCHED}, got {kind!r}")


def weights(kind: str, q: np.ndarray, keys: np.ndarray, features=None) -> np.ndarray:
  """The kernel's weights of q [H] on keys [M, H], float64."""
  head_dim = q.shape[-1]
  if kind == "softmax":
    logits = keys @ q / np.sqrt(head_dim)
    return np.exp(logits - logits.max())
  if kind == "polynomial":
    return (keys @ q) ** 4
  fq = np.asarray(features(jnp.asarray(q, jnp.float32)), np.float64)
  fk = np.asarray(features(jnp.asarray(keys, jnp.float32)), np.float64)
  return (fk @ fq) ** 2


def trial_weights(kind: str, head_dim: int, num_others: int, sketch_dim: int = 0,
                  trials: int = 100, seed: int = 0):
  """Yields (keys [num_others + 1, H], the kernel's weights of q = keys[0] on
  them) for each trial: keys Gaussian scaled to norm sqrt(H), a fresh sketch
  every trial."""
  rng = np.random.default_rng(seed)
  for t in range(trials):
    keys = rng.standard_normal((num_others + 1, head_dim))
    keys *= np.sqrt(head_dim) / np.linalg.norm(keys, axis=1, keepdims=True)
    features = (make_features(kind, head_dim, sketch_dim, jax.random.PRNGKey(seed * 100003 + t))
                if kind in SKETCHED else None)
    yield keys, weights(kind, keys[0], keys, features)


def match_shares(kind: str, head_dim: int, num_others: int, sketch_dim: int = 0,
                 trials: int = 100, seed: int = 0) -> np.ndarray:
  """[trials] shares of the weight on the matching key (keys[0] = q) against
  num_others independent keys; a fresh sketch every trial."""
  return np.array([w[0] / w.sum() for _, w in
                   trial_weights(kind, head_dim, num_others, sketch_dim, trials, seed)])


def weight_scales(kind: str, head_dim: int, sketch_dim: int, num_keys: int = 1024,
                  trials: int = 10, seed: int = 0) -> dict:
  """The sketched weights on the exact polynomial's scale: mean weight on an
  independent key over the exact kernel's mean (both measured on the same
  keys), and the weight on a key equal to q over (q . q)^4 = H^4; means over
  `trials` fresh sketches, each on num_keys keys."""
  others, match = [], []
  for keys, w in trial_weights(kind, head_dim, num_keys, sketch_dim, trials, seed):
    exact = weights("polynomial", keys[0], keys)
    others.append(w[1:].mean() / exact[1:].mean())
    match.append(w[0] / exact[0])
  return dict(kind=kind, sketch_dim=sketch_dim, other_ratio=float(np.mean(others)),
              match_ratio=float(np.mean(match)))


def run(head_dim: int, others: list[int], sketch_dims: list[int], trials: int, seed: int):
  rows = []
  for kind in KINDS:
    for r in (sketch_dims if kind in SKETCHED else [0]):
      for n in others:
        s = match_shares(kind, head_dim, n, r, trials, seed)
        row = dict(kind=kind, sketch_dim=r, others=n, mean=float(s.mean()),
                   median=float(np.median(s)), p10=float(np.quantile(s, 0.1)))
        if kind in ("gaussian", "hadamard"):   # share = r / (r + c N)  =>  c = (1 / share - 1) r / N
          row["c"] = float((1.0 / row["mean"] - 1.0) * r / n)
        rows.append(row)
        print(f"{kind:10s} r={r:4d} N={n:5d}: mean share {row['mean']:.3f}", flush=True)
  return rows


def scales_markdown(scales) -> str:
  lines = ["", "Sketched weights on the exact kernel's scale (the scale of the exact local "
           "blocks beside the sketched prefix): mean weight on an independent key over "
           "the exact (q . k)^4's mean (3 H^2), and the weight on the matching key over "
           "H^4; 1024 keys, 10 fresh sketches.", "",
           "| sketch | r | independent key | matching key |", "|---|---:|---:|---:|"]
  for x in scales:
    lines.append(f"| {x['kind']} | {x['sketch_dim']} | {x['other_ratio']:.3g} | "
                 f"{x['match_ratio']:.3g} |")
  return "\n".join(lines) + "\n"


def markdown(meta, rows) -> str:
  others = sorted({r["others"] for r in rows})
  lines = [f"# Weight on the matching key (`{meta['command']}`)", "",
           f"H = {meta['head_dim']}, q and keys Gaussian scaled to norm sqrt(H), one key = q, "
           f"N others; mean over {meta['trials']} trials (a fresh sketch each), "
           "median in brackets.", "",
           "| kernel | r | " + " | ".join(f"N = {n}" for n in others) + " | fitted c |",
           "|---|---:|" + "---:|" * len(others) + "---:|"]
  for kind in KINDS:
    for r in sorted({x["sketch_dim"] for x in rows if x["kind"] == kind}):
      cells = {x["others"]: x for x in rows if x["kind"] == kind and x["sketch_dim"] == r}
      cs = [cells[n]["c"] for n in others if "c" in cells[n]]
      shares = " | ".join(f"{cells[n]['mean']:.3f} ({cells[n]['median']:.3f})" for n in others)
      lines.append(f"| {kind} | {r or '-'} | {shares} | "
                   + (f"{np.mean(cs):.2f} |" if cs else "- |"))
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--head-dim", type=int, default=32)
  p.add_argument("--others", type=int, nargs="+", default=[16, 48, 256, 1024])
  p.add_argument("--sketch-dims", type=int, nargs="+", default=[16, 32, 64])
  p.add_argument("--trials", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", default=RESULTS)
  p.add_argument("--tag", default="")
  args = p.parse_args(argv)
  rows = run(args.head_dim, args.others, args.sketch_dims, args.trials, args.seed)
  scales = [weight_scales(kind, args.head_dim, r, seed=args.seed)
            for kind in SKETCHED for r in args.sketch_dims]
  for x in scales:
    print(f"{x['kind']:10s} r={x['sketch_dim']:4d}: weight / exact weight, independent key "
          f"{x['other_ratio']:.3g}, matching key {x['match_ratio']:.3g}", flush=True)
  command = " ".join(["python bench/retrieval_share.py", *(sys.argv[1:] if argv is None else argv)])
  meta = dict(command=command, head_dim=args.head_dim, trials=args.trials, seed=args.seed)
  stem = os.path.join(args.out_dir, "retrieval_share" + (f"-{args.tag}" if args.tag else ""))
  os.makedirs(args.out_dir, exist_ok=True)
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta, rows=rows, scales=scales), f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(meta, rows) + scales_markdown(scales))
  return rows


if __name__ == "__main__":
  main()
