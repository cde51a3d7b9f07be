"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), issue 14 §1.

Sequences of key-value pairs, noise, then queries for some of the keys; the
model is scored on the answers only (`pallas_polysketch.train.RecallData`,
generated in the package: no download). Every variant trains the same small
GPT (same seed, data order and schedule) at each (sequence length, pairs,
learning rate); the best learning rate per (variant, length, pairs) is
reported, as Zoology does, with the state size per layer:

  softmax        KV cache 2 T H per head (grows with T)
  polynomial     exact degree-4 polynomial attention (same KV cache)
  learned+local  PolySketch, learned sketch + exact local blocks: state r^2 (H + 1) per head
  random+local   PolySketch, random sketch + exact local blocks
  learned        PolySketch, learned sketch, no exact local blocks
  local          exact local blocks alone (sketch="none"): what the sketch adds

Training sequences put the pairs at a random offset before the queries (a
curriculum over distances, `RecallData`); the held-out sequences put them at
the start, the farthest from the queries, and score each key's first query
only, so the accuracy measures retrieval from the pairs.

Writes bench/results/recall-<tag>.{json,md,png} after every run, and with
--eval-every recall-<tag>-curve.png (accuracy against the step), and where one
length ran with three or more numbers of pairs a table against the pairs and
recall-<tag>-pairs.png; a cut-short
run keeps what it has; --resume skips runs already in the JSON; --merge
combines the JSONs of runs split over processes (a variant run with another
--sketch-dim or --steps gets its own row).

  JAX_PLATFORMS=cpu python bench/recall.py --tag cpu                 # the committed grid
  JAX_PLATFORMS=cpu python bench/recall.py --seqs 256 512 1024 2048 --pairs 8 16 32 64 \\
      --keys 64 --values 64 --steps 20000 --lrs 1e-3 3e-3 --dim 128 --tag accel   # on an accelerator
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time

import numpy as np

from pallas_polysketch.models.gpt import GPTConfig
from pallas_polysketch.train import RecallData, TrainConfig, train

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_quality import (VARIANTS as LM_VARIANTS, sketch_hidden, takes_warmup,  # noqa: E402
                        variant_label)

# name -> (attention, sketch, local_exact)
VARIANTS = {name: LM_VARIANTS[name] for name in
            ("softmax", "polynomial", "learned+local", "random+local", "learned", "local")}


def state_floats(variant, seq, head_dim, sketch_dim, block_size):
  """Floats of decoding state per head after `seq` tokens: the KV cache for
  softmax and polynomial; for PolySketch the r^2 (H + 1) prefix state plus, with
  exact local blocks, the current block's keys and values (2 b H)."""
  attention, sketch, local_exact = VARIANTS[variant]
  if attention in ("softmax", "polynomial"):
    return 2 * seq * head_dim
  local = 2 * min(block_size, seq) * head_dim if local_exact else 0
  return (0 if sketch == "none" else sketch_dim ** 2 * (head_dim + 1)) + local


def recall_data(args, seq, pairs):
  """The task of one grid point (its held-out set fixed by seq and pairs)."""
  return RecallData(num_keys=max(args.keys, pairs), num_values=args.values,
                    num_noise=args.noise, num_pairs=pairs,
                    num_queries=min(args.queries, pairs) if args.distinct_queries else args.queries,
                    seed=1234 + seq + pairs, distinct_queries=args.distinct_queries)  # random_offset


def polynomial_warmup(args, variant):
  """--polynomial-warmup for the PolySketch variants, 0 for the others."""
  return args.polynomial_warmup if takes_warmup(variant) else 0


def model_dir(args, variant, seq, pairs, lr):
  """Where --save-models puts a run's model (MODEL_NAME)."""
  warmup = polynomial_warmup(args, variant)
  hidden = sketch_hidden(args, variant)
  return os.path.join(os.path.abspath(args.save_models),
                      f"{variant}-T{seq}-pairs{pairs}-lr{lr:g}-r{args.sketch_dim}"
                      + (f"-h{hidden}" if hidden else "")
                      + f"-steps{args.steps}"
                      + (f"-pw{warmup}" if warmup else "")
                      + (f"-seed{args.seed}" if args.seed else ""))


def model_config(args, variant, data, seq):
  attention, sketch, local_exact = VARIANTS[variant]
  return GPTConfig(vocab_size=data.vocab_size, num_layers=args.layers, num_heads=args.heads,
                   embed_dim=args.dim, attention=attention, sketch=sketch,
                   sketch_dim=args.sketch_dim, block_size=min(args.block_size, seq),
                   local_exact=local_exact, sketch_hidden_dim=sketch_hidden(args, variant))


def init_name(args):
  """--init-from's model name (its directory's), as runs record it; "" without."""
  return os.path.basename(os.path.normpath(args.init_from)) if args.init_from else ""


def run_one(args, variant, seq, pairs, lr, init_from=None, keys_from=None):
  """One training run; init_from: a `Checkpoint` to start from (--init-from),
  keys_from: the key count its vocabulary was grown from (`grow_key_vocabulary`)."""
  data = recall_data(args, seq, pairs)
  mc = model_config(args, variant, data, seq)
  warmup = polynomial_warmup(args, variant)
  hidden = mc.sketch_hidden_dim
  cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, context=seq,
                    learning_rate=lr, warmup_steps=max(1, args.steps // 10), seed=args.seed,
                    weight_decay=args.weight_decay, polynomial_warmup_steps=warmup,
                    eval_every=args.eval_every or args.steps, eval_batches=args.eval_batches,
                    log_every=50)
  t0 = time.time()
  init = dict(init_from=init_name(args)) if init_from is not None else {}
  if keys_from is not None:
    init["keys_from"] = keys_from
  label = f"{variant_label(variant, warmup)} T={seq} pairs={pairs} lr={lr:g}"
  model, res = train(mc, data, cfg, progress=False,
                     log=(lambda s: print(f"  {label}: {s}", flush=True)) if args.eval_every else None,
                     init_from=init_from)
  curve = [dict(step=e["step"], val_acc=e["val_acc"], val_loss=e["val_loss"],
                elapsed_s=e["elapsed_s"], exact_polynomial=e["exact_polynomial"])
           for e in res["evals"]]
  probe = {"probe": probe_attention(model, data, seq, mc.block_size)} if args.probe else {}
  if args.save_models:
    from pallas_polysketch.train import save_checkpoint
    save_checkpoint(model_dir(args, variant, seq, pairs, lr), model, train_config=cfg,
                    extra=dict(args=vars(args)))
  return dict(variant=variant, seq=seq, pairs=pairs, lr=lr, sketch_dim=args.sketch_dim,
              steps=args.steps, polynomial_warmup=warmup, seed=args.seed, **init, **probe,
              **({"sketch_hidden": hidden} if hidden else {}),
              val_acc=res["val_acc"], val_loss=res["val_loss"], params=res.get("params"), curve=curve,
              steps_per_s=res["steps_per_s"], wall_s=time.time() - t0,
              state_floats=state_floats(variant, seq, args.dim // args.heads, args.sketch_dim,
                                        args.block_size))


def grow_key_vocabulary(ckpt, new_config, num_values, num_noise, seed=0):
  """`ckpt` with its model's key vocabulary grown to fit new_config.vocab_size,
  for --init-from with more keys than the model trained with (RecallData's
  layout: 0, keys, values, noise; values and noise keep their counts and move up
  by the added keys). Every other variable is the saved one; the old tokens'
  embedding rows move with their ids and the added keys' rows are new_config's
  fresh initialisation scaled to the old keys' mean norm, so on sequences of
  old tokens (ids mapped) the grown model computes what the saved one did.
  Returns (Checkpoint without optimizer or tokenizer, old key count)."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from pallas_polysketch.models.gpt import GPT
  old = ckpt.model
  old_keys = old.config.vocab_size - 1 - num_values - num_noise
  added = new_config.vocab_size - old.config.vocab_size
  if (added <= 0 or old_keys < 1
      or dataclasses.replace(old.config, vocab_size=new_config.vocab_size) != new_config):
    raise ValueError(f"only a larger key vocabulary can be grown: the saved model's vocab_size "
                     f"{old.config.vocab_size}, the run's {new_config.vocab_size} "
                     f"({num_values} values, {num_noise} noise tokens), other fields must match")
  model = GPT(new_config, rngs=nnx.Rngs(seed))
  fresh = model.embed.embedding[...]
  nnx.update(model, jax.tree.map(jnp.copy, nnx.state(old)))   # the embedding replaced below
  saved = old.embed.embedding[...]
  new_rows = fresh[1 + old_keys:1 + old_keys + added]
  scale = (jnp.mean(jnp.linalg.norm(saved[1:1 + old_keys].astype(jnp.float32), axis=-1))
           / jnp.mean(jnp.linalg.norm(new_rows.astype(jnp.float32), axis=-1)))
  model.embed.embedding.set_value(jnp.concatenate(
      [saved[:1 + old_keys], (new_rows * scale).astype(saved.dtype), saved[1 + old_keys:]]))
  return dataclasses.replace(ckpt, model=model, optimizer=None, tokenizer=None), old_keys


def attention_weights(kind, call):
  """Unnormalised attention weights [B, N, T, T] (float64) of one recorded
  attention call: `call` holds its q, k ([B, T, N, H]), for PolySketch fq, fk
  ([B, T, N, r]), and the keyword arguments it was called with. kind:
  "softmax" exp(q k / sqrt H); "polynomial" (q k)^p; "polysketch" the op's
  weights ((q k)^p inside a block with exact local blocks, (fq fk)^2 across
  blocks; DESIGN 1.3). Causal: zero above the diagonal."""
  q = np.asarray(call["q"], np.float64).transpose(0, 2, 1, 3)
  k = np.asarray(call["k"], np.float64).transpose(0, 2, 1, 3)
  kw = call["kwargs"]
  T = q.shape[2]
  qk = q @ k.transpose(0, 1, 3, 2)
  if kind == "softmax":
    scores = qk * kw.get("scale", 1.0 / np.sqrt(q.shape[-1]))
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
  elif kind == "polynomial":
    w = qk ** kw.get("degree", 4)
  elif kind == "polysketch":
    fq = np.asarray(call["fq"], np.float64).transpose(0, 2, 1, 3)
    fk = np.asarray(call["fk"], np.float64).transpose(0, 2, 1, 3)
    w = (fq @ fk.transpose(0, 1, 3, 2)) ** 2
    if kw.get("local_exact", True):
      block = np.arange(T) // kw["block_size"]
      w = np.where(block[:, None] == block[None, :], qk ** kw.get("degree", 4), w)
  else:
    raise ValueError(f"kind must be softmax, polynomial or polysketch, got {kind!r}")
  return np.where(np.tril(np.ones((T, T), bool)), w, 0.0)


PAIR_WINDOW = 3   # the key, its value and the token after it


def pair_shares(weights, inputs, mask, num_pairs, normalization_bias=0.0, block_size=None):
  """Where the scored queries' attention goes, best head, mean over the queries.

  weights [B, N, T, T] unnormalised (zero above the diagonal); inputs [B, T]
  tokens with the pairs at positions 0..2 num_pairs - 1 (held-out sequences);
  mask [B, T] 1 at the scored query positions. A row's weights are divided by
  normalization_bias + their sum (0 for softmax, the op's bias for the
  polynomial kinds). Returns a dict:
    share   the weight on the query's pair window: the matching key, its value
            and the token after it (PAIR_WINDOW; the token a previous-token
            head copies the pair into, which a trained 2-layer softmax model
            reads in its second layer);
    peak    the largest weight on any one token before the query's block
            (block_size; every earlier token if None): can the layer single
            out one far token at all;
    far     the weight on all the tokens before the query's block;
    chance  the mean of PAIR_WINDOW / (i + 1), the share of uniform weights."""
  shares, peaks, fars, chance = [], [], [], []
  for b, i in zip(*np.nonzero(mask)):
    keys = np.nonzero(inputs[b, :2 * num_pairs:2] == inputs[b, i])[0]
    if len(keys) != 1:
      raise ValueError(f"query at ({b}, {i}) matches {len(keys)} of the pairs' keys")
    j = 2 * keys[0]
    row = weights[b, :, i, :] / (normalization_bias + weights[b, :, i, :].sum(-1, keepdims=True))
    shares.append(row[:, j:j + PAIR_WINDOW].sum(-1).max())
    block_start = i - i % block_size if block_size else i
    peaks.append(row[:, :block_start].max() if block_start else 0.0)
    fars.append(row[:, :block_start].sum(-1).max() if block_start else 0.0)
    chance.append(PAIR_WINDOW / (i + 1))
  return dict(share=float(np.mean(shares)), peak=float(np.mean(peaks)),
              far=float(np.mean(fars)), chance=float(np.mean(chance)))


def probe_attention(model, data, seq, block_size):
  """Where the trained `model` puts each held-out query's attention, per layer
  (`pair_shares` on one held-out batch, far tokens: those before the query's
  block of block_size), as the model computes it, and for PolySketch also what
  the exact polynomial (q k)^p would give on the same q, k (is the sketch or
  the q, k the limit?). Runs the model eagerly with its attention op wrapped
  to record its inputs."""
  import jax
  from pallas_polysketch import nn as ps_nn

  calls = []
  originals = dict(softmax=jax.nn.dot_product_attention,
                   polynomial=ps_nn.polynomial_attention,
                   polysketch=ps_nn.polysketch_attention)

  def recorder(kind):
    def op(q, k, v, *rest, **kwargs):
      fq, fk = rest if kind == "polysketch" else (None, None)
      calls.append(dict(kind=kind, q=q, k=k, fq=fq, fk=fk, kwargs=kwargs))
      return originals[kind](q, k, v, *rest, **kwargs)
    return op

  inputs, _, mask = data.val_batches(1, 64, seq)[0]
  try:
    jax.nn.dot_product_attention = recorder("softmax")
    ps_nn.polynomial_attention = recorder("polynomial")
    ps_nn.polysketch_attention = recorder("polysketch")
    model(jax.numpy.asarray(inputs))
  finally:
    jax.nn.dot_product_attention = originals["softmax"]
    ps_nn.polynomial_attention = originals["polynomial"]
    ps_nn.polysketch_attention = originals["polysketch"]
  layers = []
  for call in calls:
    bias = 0.0 if call["kind"] == "softmax" else call["kwargs"].get("normalization_bias", 1.0)
    rec = dict(kind=call["kind"], **pair_shares(attention_weights(call["kind"], call), inputs,
                                                mask, data.num_pairs, bias, block_size))
    if call["kind"] == "polysketch":
      exact = pair_shares(attention_weights("polynomial", call), inputs, mask, data.num_pairs,
                          bias, block_size)
      rec.update(exact_share=exact["share"], exact_peak=exact["peak"], exact_far=exact["far"])
    layers.append(rec)
  return layers


PROBE_HEADER = (
    "Best head, mean over one held-out batch's scored queries: share, the weight of a "
    "query's attention on its pair window (the matching key, its value and the next "
    "token); peak, the largest weight on any one token before the query's block; far, "
    "the weight on all the tokens before it. For PolySketch also the three for the exact "
    "(q k)^p on the same q, k. Uniform share: 3 / (i + 1).")
PROBE_COLUMNS = ("| variant | T | pairs | lr | layer | share | peak | far | exact (q k)^p: share "
                 "| peak | far | uniform share |")


def probe_cells(x):
  """A probe record's table cells (a record without `far` predates it: '-')."""
  def cell(key):
    return f"{x[key]:.3f}" if key in x else "-"
  return " | ".join(cell(k) for k in ("share", "peak", "far", "exact_share", "exact_peak",
                                        "exact_far", "chance"))


def probe_line(x):
  exact = (f"; exact (q k)^p on its q, k: {x['exact_share']:.3f}, {x['exact_peak']:.3f}, "
           f"{x.get('exact_far', float('nan')):.3f}" if "exact_share" in x else "")
  return (f"pair window {x['share']:.3f}, peak far token {x['peak']:.3f}, far "
          f"{x.get('far', float('nan')):.3f}{exact} (uniform share {x['chance']:.3f})")


MODEL_NAME = (r"(?P<variant>.+)-T(?P<seq>\d+)-pairs(?P<pairs>\d+)-lr(?P<lr>.+?)"   # --save-models
              r"(?:-r(?P<sketch_dim>\d+)(?:-h(?P<sketch_hidden>\d+))?-steps(?P<steps>\d+))?"
              r"(?:-pw(?P<warmup>\d+))?"
              r"(?:-seed(?P<seed>\d+))?")


def named_run(name):
  """A `--save-models` name (MODEL_NAME) as the fields a run records; None if
  name is not one. sketch_dim and steps are None in names written before
  they were part of it."""
  m = re.fullmatch(MODEL_NAME, name)
  if m is None:
    return None
  optional = lambda group: None if m[group] is None else int(m[group])
  return dict(variant=m["variant"], seq=int(m["seq"]), pairs=int(m["pairs"]), lr=float(m["lr"]),
              sketch_dim=optional("sketch_dim"), steps=optional("steps"),
              sketch_hidden=optional("sketch_hidden"), polynomial_warmup=int(m["warmup"] or 0),
              seed=int(m["seed"] or 0))


def reprobe(models_dir, out_stem):
  """Probes every model `--save-models` wrote under models_dir again with this
  file's `probe_attention` (the data rebuilt from each run's saved arguments);
  writes out_stem.{json,md}. Returns the records."""
  from pallas_polysketch.train import load_checkpoint
  records = []
  for name in sorted(os.listdir(models_dir)):
    ckpt = load_checkpoint(os.path.join(models_dir, name))
    args = argparse.Namespace(**ckpt.extra["args"])
    named = named_run(name)
    seq = named["seq"]
    data = recall_data(args, seq, named["pairs"])
    block = min(args.block_size, seq)
    records.append(dict(model=name, variant=named["variant"], seq=seq, pairs=named["pairs"],
                        lr=named["lr"], sketch_dim=args.sketch_dim, steps=args.steps,
                        polynomial_warmup=named["polynomial_warmup"],
                        probe=probe_attention(ckpt.model, data, seq, block)))
    for layer, x in enumerate(records[-1]["probe"]):
      print(f"{name} layer {layer}: {probe_line(x)}", flush=True)
  with open(out_stem + ".json", "w") as f:
    json.dump(dict(models_dir=models_dir, records=records), f, indent=1)
  lines = [f"# Attention probe of the models in {models_dir}", "", PROBE_HEADER, "",
           PROBE_COLUMNS.replace("| T | pairs | lr |", "| T | pairs | lr | r | steps |"),
           "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * 7]
  for r in records:
    for layer, x in enumerate(r["probe"]):
      lines.append(f"| {variant_label(r['variant'], r['polynomial_warmup'])} | {r['seq']} | "
                   f"{r['pairs']} | {r['lr']:g} | {r['sketch_dim']} | {r['steps']} | {layer} | "
                   + probe_cells(x) + " |")
  with open(out_stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  return records


def eval_lengths(models_dirs, seqs, out_stem):
  """Evaluates every model `--save-models` wrote under models_dirs on the
  held-out task of each length in seqs (the pairs and queries it trained on,
  more noise between them: the pairs at the start, the queries at the end),
  without training: how retrieval learned at one length holds at others.
  Writes out_stem.{json,md,png}; returns the records."""
  import jax.numpy as jnp
  from flax import nnx
  from pallas_polysketch.train import load_checkpoint, loss_fn
  evaluate = nnx.jit(loss_fn)
  records = []
  for models_dir in models_dirs:
    for name in sorted(os.listdir(models_dir)):
      named = named_run(name)
      if named is None:
        print(f"skipped {name}: not a --save-models name", flush=True)
        continue
      ckpt = load_checkpoint(os.path.join(models_dir, name))
      args = argparse.Namespace(**ckpt.extra["args"])
      pairs = named["pairs"]
      rec = dict(model=name, models_dir=models_dir, variant=named["variant"],
                 train_seq=named["seq"], pairs=pairs, lr=named["lr"], sketch_dim=args.sketch_dim,
                 steps=args.steps, seed=args.seed, polynomial_warmup=named["polynomial_warmup"],
                 init_from=init_name(args) if getattr(args, "init_from", None) else "",
                 lengths=[])
      cfg = ckpt.model.config
      for T in seqs:
        data = recall_data(args, T, pairs)
        if data.min_context > T:
          print(f"{name} at T={T}: skipped (too short for its pairs and queries)", flush=True)
          continue
        accs = [float(evaluate(ckpt.model, *(jnp.asarray(x) for x in batch))[1])
                for batch in data.val_batches(args.eval_batches, args.batch_size, T)]
        rec["lengths"].append(dict(
            seq=T, val_acc=float(np.mean(accs)),
            state_floats=state_floats(rec["variant"], T, cfg.embed_dim // cfg.num_heads,
                                      cfg.sketch_dim, cfg.block_size)))
        print(f"{name} at T={T}: acc {rec['lengths'][-1]['val_acc']:.3f}", flush=True)
      records.append(rec)
  with open(out_stem + ".json", "w") as f:
    json.dump(dict(models_dirs=list(models_dirs), seqs=list(seqs), records=records), f, indent=1)
  lines = [f"# MQAR held-out accuracy at other lengths, models of {', '.join(models_dirs)}", "",
           "Each model trained at its T (no training here); evaluated on held-out sequences of "
           "each length: its pairs at the start, its queries at the end, noise between; each "
           "key's first query scored. State: floats per head after T tokens.", "",
           "| model | trained at T | pairs | lr | r | steps | "
           + " | ".join(f"T = {T}" for T in seqs) + " |",
           "|---|---:|---:|---:|---:|---:|" + "---:|" * len(seqs)]
  for r in records:
    at = {x["seq"]: x for x in r["lengths"]}
    lines.append(f"| {variant_label(r['variant'], r['polynomial_warmup'])}"
                 + (f", seed {r['seed']}" if r["seed"] else "")
                 + (f", from model {r['init_from']}" if r["init_from"] else "")
                 + f" | {r['train_seq']} | {r['pairs']} | {r['lr']:g} | {r['sketch_dim']} | "
                 f"{r['steps']} | "
                 + " | ".join(f"{at[T]['val_acc']:.1%} ({at[T]['state_floats']:,})" if T in at
                              else "-" for T in seqs) + " |")
  with open(out_stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for r in records:
    ax.plot([x["seq"] for x in r["lengths"]], [x["val_acc"] for x in r["lengths"]], marker="o",
            label=r["model"])
  ax.set_xscale("log", base=2)
  ax.set_xlabel("held-out sequence length T")
  ax.set_ylabel("answer accuracy (first queries)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_stem + ".png", dpi=110)
  plt.close(fig)
  return records


def model_key(r):
  """What a run's saved model's name (MODEL_NAME) says of the run."""
  return (r["variant"], r["seq"], r["pairs"], r["lr"], r["sketch_dim"], r["steps"],
          r.get("polynomial_warmup", 0), r.get("seed", 0), r.get("sketch_hidden"))


def parent_run(r, runs):
  """The run among runs whose saved model r started from (--init-from), or None."""
  named = named_run(r.get("init_from", ""))
  if named is None or named["steps"] is None:
    return None
  return next((q for q in runs if q is not r and model_key(q) == model_key(named)), None)


def row_labels(runs):
  """A table row per variant (with its polynomial warm-up, if any), or per
  (that, sketch_dim, steps) where merged runs of one differ in those, and per
  seed: [label per run], labels in order. A run trained from another merged run's saved
  model (--init-from, e.g. at a longer T or with more pairs) joins the row of
  the run its chain of models starts at, labelled by what the chain varies
  ("length curriculum", "pairs curriculum", "length and pairs curriculum")."""
  def root(r):
    seen = [r]
    while (q := parent_run(seen[-1], runs)) is not None and all(q is not x for x in seen):
      seen.append(q)
    return seen[-1]
  roots = [root(r) for r in runs]
  chained = {id(q) for r, q in zip(runs, roots) if q is not r}   # roots with descendants
  def base(r):
    return (variant_label(r["variant"], r.get("polynomial_warmup", 0))
            + (f", sketch hidden width {r['sketch_hidden']}" if r.get("sketch_hidden") else "")
            + (f", from model {r['init_from']}" if r.get("init_from") else ""))
  configs = {}
  for q in roots:
    configs.setdefault(base(q), set()).add((q["sketch_dim"], q["steps"]))
  def label(q):
    if len(configs[base(q)]) == 1:
      return base(q)
    sketch = "" if VARIANTS[q["variant"]][0] != "polysketch" else f"r = {q['sketch_dim']}, "
    return f"{base(q)} ({sketch}{q['steps']} steps)"
  def curriculum(q):   # what the chain from root q varies: its lengths, its pairs or both
    members = [r for r, root_ in zip(runs, roots) if root_ is q]
    varied = [what for what, key in (("length", "seq"), ("pairs", "pairs"))
              if len({r[key] for r in members}) > 1]
    return f", {' and '.join(varied) or 'length'} curriculum"
  labels = [label(q) + (f", seed {r['seed']}" if r.get("seed") else "")
            + (curriculum(q) if id(q) in chained else "") for r, q in zip(runs, roots)]
  first = {}
  for r, q, x in zip(runs, roots, labels):
    first.setdefault(x, (list(VARIANTS).index(q["variant"]), q.get("polynomial_warmup", 0),
                         q["sketch_dim"], q["steps"], q.get("init_from", ""), r.get("seed", 0)))
  return labels, sorted(first, key=first.get)


def best_runs(runs, labels=None):
  """The best learning rate per (row label, seq, pairs); labels default to the variants."""
  best = {}
  for r, label in zip(runs, labels or [r["variant"] for r in runs]):
    key = (label, r["seq"], r["pairs"])
    if key not in best or r["val_acc"] > best[key]["val_acc"]:
      best[key] = r
  return best


def write_outputs(stem, meta, runs):
  with open(stem + ".json", "w") as f:
    json.dump(dict(meta, runs=runs), f, indent=1)
  labels, variants = row_labels(runs)
  best = best_runs(runs, labels)
  seqs = sorted({k[1] for k in best})
  pairs = sorted({k[2] for k in best})
  lines = [f"# MQAR recall ({meta['command']})", "", meta["setup"], "",
           "Answer accuracy on held-out sequences (best learning rate of "
           f"{meta['lrs']}); state per head after T tokens in floats."
           + (" A curriculum row: each model but the first started from another of the"
              " row's (`--init-from`, at a shorter T or with fewer pairs; each run's `init_from`"
              " in the JSON names which)."
              if any(x.endswith(" curriculum") for x in variants) else ""), ""]
  for p in pairs:
    lines += [f"## {p} key-value pairs", "",
              "| variant | " + " | ".join(f"T={t}" for t in seqs) + " | state per head at the largest T |",
              "|---|" + "---:|" * (len(seqs) + 1)]
    for v in variants:
      if not any((v, t, p) in best for t in seqs):
        continue
      cells, state = [], ""
      for t in seqs:
        r = best.get((v, t, p))
        cells.append("-" if r is None else f"{100 * r['val_acc']:.1f}% (lr {r['lr']:g})")
        if r is not None:
          state = f"{r['state_floats']:,}"
      lines.append(f"| {v} | " + " | ".join(cells) + f" | {state} |")
    lines.append("")
  swept = [t for t in seqs if len({k[2] for k in best if k[1] == t}) > 2]
  for t in swept:   # a sweep over the number of pairs at one length
    counts = sorted({k[2] for k in best if k[1] == t})
    lines += [f"## Against the number of key-value pairs at T = {t}", "",
              "| variant | " + " | ".join(f"{p} pairs" for p in counts) + " | state per head |",
              "|---|" + "---:|" * (len(counts) + 1)]
    for v in variants:
      row = [best.get((v, t, p)) for p in counts]
      if sum(r is not None for r in row) < 2:
        continue
      state = next(r["state_floats"] for r in row if r is not None)
      lines.append(f"| {v} | " + " | ".join("-" if r is None else f"{100 * r['val_acc']:.1f}%"
                                             for r in row) + f" | {state:,} |")
    lines.append("")
  probed = [(label, r) for label, r in zip(labels, runs) if r.get("probe")]
  if probed:   # --probe
    lines += ["## Where the held-out queries' attention goes (`--probe`)", "",
              PROBE_HEADER, "", PROBE_COLUMNS, "|---|---:|---:|---:|---:|" + "---:|" * 7]
    for label, r in probed:
      for layer, x in enumerate(r["probe"]):
        lines.append(f"| {label} | {r['seq']} | {r['pairs']} | {r['lr']:g} | {layer} | "
                     + probe_cells(x) + " |")
    lines.append("")
  with open(stem + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4), squeeze=False)
  for ax, p in zip(axes[0], pairs):
    for v in variants:
      pts = [(t, best[(v, t, p)]["val_acc"]) for t in seqs if (v, t, p) in best]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{p} pairs")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("answer accuracy")
    ax.grid(alpha=0.3)
  axes[0][0].legend()
  fig.suptitle(meta["setup"], fontsize=8)
  fig.tight_layout()
  fig.savefig(stem + ".png", dpi=110)
  plt.close(fig)
  if swept:
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in swept:
      for v in variants:
        pts = sorted((p, r["val_acc"]) for (v_, t_, p), r in best.items() if (v_, t_) == (v, t))
        if len(pts) > 1:
          ax.plot(*zip(*pts), marker="o", label=f"{v}, T={t}")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("answer accuracy (held out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(meta["setup"], fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + "-pairs.png", dpi=110)
    plt.close(fig)
  curves = [(label, r) for label, r in zip(labels, runs) if len(r.get("curve", [])) > 1]
  if curves:   # --eval-every: held-out accuracy against the training step
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in curves:
      ax.plot([c["step"] for c in r["curve"]], [c["val_acc"] for c in r["curve"]], marker="o",
              label=f"{label}, T={r['seq']}, {r['pairs']} pairs, lr {r['lr']:g}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("answer accuracy (held out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "-curve.png", dpi=110)
    plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seqs", type=int, nargs="+", default=[64])
  p.add_argument("--pairs", type=int, nargs="+", default=[4])
  p.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--queries", type=int, default=16)
  p.add_argument("--distinct-queries", action="store_true",
                 help="each query a different key of the pairs: min(--queries, pairs) of them")
  p.add_argument("--keys", type=int, default=8, help="key vocabulary (at least --pairs)")
  p.add_argument("--values", type=int, default=8, help="value vocabulary")
  p.add_argument("--noise", type=int, default=8, help="noise vocabulary")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--sketch-dim", type=int, default=16)
  p.add_argument("--sketch-hidden", type=int, default=None,
                 help="the learned sketch's hidden width (default 8 x --sketch-dim, the paper's)")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--eval-every", type=int, default=0,
                 help="also evaluate every this many steps (each run's `curve` in the JSON, "
                      "printed as it goes); 0: at the end only")
  p.add_argument("--polynomial-warmup", type=int, default=0, metavar="STEPS",
                 help="PolySketch variants train their first STEPS steps with the exact "
                      "polynomial attention (same parameters), then with the sketch "
                      "(`TrainConfig.polynomial_warmup_steps`); a row of its own")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--probe", action="store_true",
                 help="after training, record per layer the share of each held-out query's "
                      "attention on its pair (`probe_attention`) in the run's `probe`")
  p.add_argument("--save-models", metavar="DIR",
                 help="write each trained model as an orbax checkpoint under DIR "
                      "(<variant>-T<seq>-pairs<pairs>-lr<lr>-r<r>[-h<hidden>]-steps<steps>[-pw<N>][-seed<S>]; "
                      "`load_checkpoint`)")
  p.add_argument("--reprobe", metavar="DIR",
                 help="probe the models --save-models wrote under DIR again (this file's "
                      "probe) into recall-<tag>-probe.{json,md} and exit")
  p.add_argument("--eval-lengths", nargs="+", metavar="DIR",
                 help="evaluate the models --save-models wrote under each DIR at every --seqs "
                      "length (no training) into recall-<tag>-lengths.{json,md,png} and exit")
  p.add_argument("--init-from", metavar="DIR",
                 help="start from this saved model's weights (a --save-models directory; "
                      "fresh optimizer, `train(init_from=...)`), e.g. at a longer --seqs than "
                      "it trained at, or with more --pairs and --keys (its key vocabulary "
                      "grown: `grow_key_vocabulary`); --variants its variant; the rows name "
                      "the model")
  p.add_argument("--tag", default="cpu")
  p.add_argument("--resume", action="store_true")
  p.add_argument("--merge", nargs="+", metavar="JSON",
                 help="write the tables and plot of these runs' JSONs (later files win) and exit")
  p.add_argument("--out-dir", default=RESULTS)
  args = p.parse_args(argv)
  command = " ".join(["python", "bench/recall.py"] + (argv if argv is not None else sys.argv[1:]))
  setup = (f"{args.pairs} pairs of {args.keys} keys / {args.values} values, "
           f"{args.layers} layers, width {args.dim} ({args.heads} heads of "
           f"{args.dim // args.heads}), sketch_dim {args.sketch_dim}"
           + (f" (hidden {args.sketch_hidden})" if args.sketch_hidden else "")
           + f", block {args.block_size}, "
           f"{args.steps} steps of {args.batch_size} sequences, "
           + (f"min(pairs, {args.queries}) distinct" if args.distinct_queries else f"{args.queries}")
           + f" queries per sequence, lr {args.lrs}, weight decay {args.weight_decay}, seed {args.seed}")
  meta = dict(command=command, setup=setup, lrs=args.lrs, args=vars(args),
              load_before=os.getloadavg())
  os.makedirs(args.out_dir, exist_ok=True)
  stem = os.path.join(args.out_dir, f"recall-{args.tag}")
  modes = [f for f in ("merge", "reprobe", "eval_lengths", "init_from") if getattr(args, f)]
  if len(modes) > 1:
    p.error(f"give one of --merge, --reprobe, --eval-lengths, --init-from; got "
            f"{['--' + m.replace('_', '-') for m in modes]}")
  if args.reprobe:
    return reprobe(args.reprobe, stem + "-probe")
  if args.eval_lengths:
    missing = [d for d in args.eval_lengths if not os.path.isdir(d)]
    if missing:
      p.error(f"--eval-lengths: no directory {missing}")
    return eval_lengths(args.eval_lengths, args.seqs, stem + "-lengths")
  if args.merge:
    docs = []
    for path in args.merge:
      with open(path) as f:
        docs.append(json.load(f))
    merged = {}
    for doc in docs:
      for r in doc["runs"]:
        r = dict(r)   # runs written before they recorded these take their file's
        r.setdefault("sketch_dim", doc["args"]["sketch_dim"])
        r.setdefault("steps", doc["args"]["steps"])
        r.setdefault("polynomial_warmup", 0)
        r.setdefault("seed", doc["args"].get("seed", 0))
        merged[model_key(r) + (r.get("init_from", ""),)] = r
    lrs = sorted({r["lr"] for r in merged.values()})   # the learning rates of every file
    setups = []   # each file's, with every file's learning rates; the distinct ones
    for doc in docs:
      setup = doc["setup"].replace(f"lr {doc['lrs']}", f"lr {lrs}")
      setups += [] if setup in setups else [setup]
    meta = {k: v for k, v in docs[-1].items() if k != "runs"}
    meta.update(command=" + ".join(doc["command"] for doc in docs), setup="; ".join(setups),
                lrs=lrs)
    runs = sorted(merged.values(), key=lambda r: (r["seq"], r["pairs"],
                                                  list(VARIANTS).index(r["variant"]),
                                                  r["polynomial_warmup"], r["sketch_dim"],
                                                  r["steps"], r.get("init_from", ""), r["lr"]))
    write_outputs(stem, meta, runs)
    return runs
  runs = []
  if args.resume and os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      runs = json.load(f)["runs"]
  done = {(r["variant"], r["seq"], r["pairs"], r["lr"], r.get("polynomial_warmup", 0),
           r.get("init_from", ""), r.get("sketch_hidden")) for r in runs}
  if not 0 <= args.polynomial_warmup < args.steps:
    p.error(f"--polynomial-warmup must be in [0, --steps = {args.steps}), got {args.polynomial_warmup}")
  init_from = init_name(args)
  init_ckpts = {}   # (seq, pairs) -> (Checkpoint, the key count it was grown from or None)
  if args.init_from:
    named = named_run(init_from)
    if not os.path.isdir(args.init_from) or named is None:
      p.error(f"--init-from: {args.init_from} is not a model --save-models wrote "
              "(<variant>-T<seq>-pairs<pairs>-lr<lr>...)")
    if args.variants.split(",") != [named["variant"]]:
      p.error(f"--init-from {init_from} is a {named['variant']} model: give --variants "
              f"{named['variant']} (got {args.variants})")
    from pallas_polysketch.train import _check_model_config, load_checkpoint
    init_ckpt = load_checkpoint(args.init_from)
    saved_args = init_ckpt.extra.get("args") or {}
    for seq, pairs in itertools.product(args.seqs, args.pairs):
      where = f"--init-from {init_from} at T = {seq}, {pairs} pairs"
      mc = model_config(args, named["variant"], recall_data(args, seq, pairs), seq)
      ckpt, keys_from = init_ckpt, None
      if mc.vocab_size > init_ckpt.model.config.vocab_size:   # more keys: grow its vocabulary
        changed = [f"--{f} {saved_args[f]}" for f in ("values", "noise")
                   if saved_args.get(f, getattr(args, f)) != getattr(args, f)]
        if changed:
          p.error(f"{where}: the model trained with {', '.join(changed)}; only the key "
                  "vocabulary can grow")
        try:
          ckpt, keys_from = grow_key_vocabulary(init_ckpt, mc, args.values, args.noise,
                                                seed=args.seed)
        except ValueError as e:
          p.error(f"{where}: {e}")
      try:   # train()'s own check, before any training
        _check_model_config(where, ckpt, mc, None)
      except ValueError as e:
        p.error(str(e))
      init_ckpts[seq, pairs] = ckpt, keys_from
  for seq, pairs, variant, lr in itertools.product(
      args.seqs, args.pairs, args.variants.split(","), args.lrs):
    if (variant, seq, pairs, lr, polynomial_warmup(args, variant), init_from,
        sketch_hidden(args, variant)) in done:
      continue
    if recall_data(args, seq, pairs).min_context > seq:
      continue
    if args.save_models and os.path.exists(model_dir(args, variant, seq, pairs, lr)):
      p.error(f"--save-models: {model_dir(args, variant, seq, pairs, lr)} exists (a model of "
              "this run's name); pick another directory")
    r = run_one(args, variant, seq, pairs, lr, *init_ckpts.get((seq, pairs), (None, None)))
    runs.append(r)
    meta["load_after"] = os.getloadavg()
    write_outputs(stem, meta, runs)
    print(f"{variant_label(variant, r['polynomial_warmup']):14s} T={seq:5d} pairs={pairs:3d} lr={lr:g}: acc {r['val_acc']:.3f} "
          f"loss {r['val_loss']:.3f} ({r['wall_s']:.0f} s)", flush=True)
    for layer, rec in enumerate(r.get("probe", [])):
      print(f"  layer {layer}: {probe_line(rec)}", flush=True)
  return runs


if __name__ == "__main__":
  main()
