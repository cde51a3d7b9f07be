"""Train a small PolySketchFormer language model (character level or synthetic).

  python -m pallas_polysketch.train                     # synthetic recall demo
  python -m pallas_polysketch.train --data input.txt    # any UTF-8 text file

With no --data, the model learns a long-range associative-recall task the
package generates itself: key/value pairs at the start of each sequence,
filler noise, then queries for the keys at the end; the loss (and accuracy)
counts only the answers, so it falls only if attention reaches back across
the whole context (through the sketched prefix states for polysketch).
With --data, text is split 90/10 (first 90% train, last 10% validation) and
windows of --context characters are sampled at random. With --pack-separator
the text is a stream of documents split by that string: each window packs the
documents it covers into its row, with segment ids (a new segment starts right
after each separator), so attention and rotary positions stay inside each
document, and the loss skips the first token of each document (it would be
predicted from the previous one).

Optimiser: optax AdamW with linear warmup + cosine decay, gradient clipping.
Checkpoints: the model state (params and the fixed random sketches) is written
with flax.serialization msgpack as one file, beside the model config and the
tokenizer in JSON. We use msgpack rather than orbax because these models are
small, single-host and unsharded: one self-contained file with no background
threads, no directory protocol and no extra dependency; orbax earns its keep
for sharded, multi-host or asynchronous checkpoints, which this script never
writes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import serialization

from pallas_polysketch.models.gpt import GPT, CharTokenizer, GPTConfig, param_count

# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


class TextData:
  """Character-level text with a fixed 90/10 train/validation split.

  separator: None, or a string splitting the text into documents. Batches then
  carry segment ids [batch, context] (int32, from 0 in each row): the tokens
  after each separator start a new segment (the separator ends the document
  before it), and the loss mask drops the targets that start a new document.
  """

  def __init__(self, text: str, tokenizer: CharTokenizer | None = None,
               val_fraction: float = 0.1, separator: str | None = None):
    self.tokenizer = tokenizer or CharTokenizer.from_text(text)
    ids = self.tokenizer.encode(text)
    split = int(len(ids) * (1.0 - val_fraction))
    self.train_ids, self.val_ids = ids[:split], ids[split:]
    self.vocab_size = self.tokenizer.vocab_size
    self.separator = separator
    self.train_docs = self.val_docs = None
    self.num_documents = 1
    if separator is not None:
      if not separator:
        raise ValueError("separator must be a non-empty string")
      docs = document_index(text, separator)
      self.train_docs, self.val_docs = docs[:split], docs[split:]
      self.num_documents = int(docs[-1]) + 1 if len(docs) else 0

  @classmethod
  def from_file(cls, path: str, **kwargs) -> "TextData":
    with open(path, encoding="utf-8") as f:
      return cls(f.read(), **kwargs)

  @staticmethod
  def _windows(ids, starts, context, docs=None):
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    w = ids[idx]
    if docs is None:
      return w[:, :-1], w[:, 1:], np.ones((len(starts), context), np.float32)
    d = docs[idx]
    mask = (d[:, 1:] == d[:, :-1]).astype(np.float32)  # no target starts a document
    segments = (d[:, :-1] - d[:, :1]).astype(np.int32)
    return w[:, :-1], w[:, 1:], mask, segments

  def train_batch(self, rng: np.random.Generator, batch_size: int, context: int):
    if len(self.train_ids) <= context + 1:
      raise ValueError(f"training text ({len(self.train_ids)} chars) is shorter than context {context}")
    starts = rng.integers(0, len(self.train_ids) - context - 1, batch_size)
    return self._windows(self.train_ids, starts, context, self.train_docs)

  def val_batches(self, num_batches: int, batch_size: int, context: int):
    """Fixed, evenly spaced validation windows (the same for every run)."""
    n = len(self.val_ids) - context - 1
    if n <= 0:
      raise ValueError(f"validation text ({len(self.val_ids)} chars) is shorter than context {context}")
    starts = np.linspace(0, n, num_batches * batch_size).astype(np.int64)
    return [self._windows(self.val_ids, s, context, self.val_docs)
            for s in starts.reshape(num_batches, batch_size)]


def document_index(text: str, separator: str) -> np.ndarray:
  """int64 [len(text)]: the document of each character, counting the
  occurrences of separator that end at or before it (the separator belongs to
  the document it ends)."""
  ends, at = [], text.find(separator)
  while at >= 0:
    ends.append(at + len(separator))
    at = text.find(separator, at + len(separator))
  return np.searchsorted(np.asarray(ends, np.int64), np.arange(len(text)), side="right")


class RecallData:
  """Synthetic long-range associative recall (multi-query).

  Tokens: 0 = filler-separator, keys [1, 1+K), values [1+K, 1+K+V), noise
  [1+K+V, 1+K+V+F). A sequence of length `context` is

    k1 v1 k2 v2 ... kn vn | noise ... noise | q1 a1 q2 a2 ... qm am

  with n distinct keys, random values, queries drawn from the n keys and
  a_i the value paired with q_i. Targets are next tokens; the loss mask keeps
  only the answer positions (predicting a_i at q_i), so chance level is
  log(V) and the task needs attention across the whole context.
  """

  def __init__(self, num_keys: int = 16, num_values: int = 16, num_noise: int = 16,
               num_pairs: int = 8, num_queries: int = 16, seed: int = 1234):
    self.num_keys, self.num_values, self.num_noise = num_keys, num_values, num_noise
    self.num_pairs, self.num_queries = num_pairs, num_queries
    self.vocab_size = 1 + num_keys + num_values + num_noise
    self.val_seed = seed
    if num_pairs > num_keys:
      raise ValueError("num_pairs must be <= num_keys")

  def _make(self, rng: np.random.Generator, batch_size: int, context: int):
    n, m = self.num_pairs, self.num_queries
    if 2 * (n + m) + 1 > context:
      raise ValueError(f"context {context} too short for {n} pairs and {m} queries")
    keys = np.argsort(rng.random((batch_size, self.num_keys)), axis=1)[:, :n] + 1
    vals = rng.integers(0, self.num_values, (batch_size, n)) + 1 + self.num_keys
    seq = rng.integers(0, self.num_noise, (batch_size, context + 1)) + 1 + self.num_keys + self.num_values
    seq[:, 0:2 * n:2], seq[:, 1:2 * n:2] = keys, vals
    seq[:, 2 * n] = 0
    which = rng.integers(0, n, (batch_size, m))
    q_start = context + 1 - 2 * m
    rows = np.arange(batch_size)[:, None]
    seq[:, q_start::2] = keys[rows, which]
    seq[:, q_start + 1::2] = vals[rows, which]
    mask = np.zeros((batch_size, context), np.float32)
    mask[:, q_start::2] = 1.0  # position of q_i predicts a_i
    return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32), mask

  def train_batch(self, rng, batch_size, context):
    return self._make(rng, batch_size, context)

  def val_batches(self, num_batches, batch_size, context):
    rng = np.random.default_rng(self.val_seed)
    return [self._make(rng, batch_size, context) for _ in range(num_batches)]


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
  steps: int = 300
  batch_size: int = 16
  context: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  seed: int = 0
  eval_every: int = 100
  eval_batches: int = 4
  log_every: int = 10


def loss_fn(model, inputs, targets, mask, segment_ids=None):
  logits = model(inputs, segment_ids=segment_ids)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  loss = jnp.sum(losses * mask) / denom
  acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / denom
  return loss, acc


def make_optimizer(model, cfg: TrainConfig):
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=max(1, min(cfg.warmup_steps, cfg.steps - 1)),
      decay_steps=max(cfg.steps, 2), end_value=cfg.learning_rate * cfg.min_lr_ratio)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_steps(model, optimizer):
  """Jitted functional train/eval steps over (graphdef, state)."""
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def train_step(state, inputs, targets, mask, segment_ids=None):
    model, optimizer = nnx.merge(graphdef, state)
    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        model, inputs, targets, mask, segment_ids)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss, acc

  @jax.jit
  def eval_step(state, inputs, targets, mask, segment_ids=None):
    model, _ = nnx.merge(graphdef, state)
    return loss_fn(model, inputs, targets, mask, segment_ids)

  return graphdef, state, train_step, eval_step


def evaluate(eval_step, state, batches):
  losses, accs = [], []
  for batch in batches:
    loss, acc = eval_step(state, *batch)
    losses.append(float(loss))
    accs.append(float(acc))
  return float(np.mean(losses)), float(np.mean(accs))


def train(model_config: GPTConfig, data, cfg: TrainConfig, *, progress: bool = True,
          log: Callable[[str], None] | None = None):
  """Trains a GPT on `data` (TextData or RecallData). Returns (model, results dict).

  results: final val loss/accuracy, steps/s and tokens/s (excluding the first,
  compiling step), and the history of train and validation losses.
  """
  log = log or (lambda s: None)
  rng = np.random.default_rng(cfg.seed)
  model = GPT(model_config, rngs=nnx.Rngs(cfg.seed))
  optimizer = make_optimizer(model, cfg)
  graphdef, state, train_step, eval_step = make_steps(model, optimizer)
  val = data.val_batches(cfg.eval_batches, cfg.batch_size, cfg.context)
  history = {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "val_acc": []}
  log(f"model: {param_count(model):,} params, {model_config}")

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, file=sys.stderr)
  tokens_per_step = cfg.batch_size * cfg.context
  train_time = 0.0  # seconds in train steps after the first (compiling) one
  window = []
  for step in range(1, cfg.steps + 1):
    batch = data.train_batch(rng, cfg.batch_size, cfg.context)
    t0 = time.perf_counter()
    state, loss, acc = train_step(state, *batch)
    loss = float(loss)
    if step > 1:
      train_time += time.perf_counter() - t0
    if not math.isfinite(loss):
      raise FloatingPointError(f"loss is {loss} at step {step}")
    window.append(loss)
    if step % cfg.log_every == 0 or step == cfg.steps:
      history["step"].append(step)
      history["train_loss"].append(float(np.mean(window)))
      window = []
    tok_s = (step - 1) * tokens_per_step / train_time if step > 1 else 0.0
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
      bar.update(1)
    if step % cfg.eval_every == 0 or step == cfg.steps:
      vloss, vacc = evaluate(eval_step, state, val)
      history["val_step"].append(step)
      history["val_loss"].append(vloss)
      history["val_acc"].append(vacc)
      msg = f"step {step}: train {loss:.4f}  val {vloss:.4f}  val_acc {vacc:.3f}  tok/s {tok_s:,.0f}"
      log(msg)
      if bar is not None:
        bar.write(msg)
  if bar is not None:
    bar.close()
  model, _ = nnx.merge(graphdef, state)
  results = {
      "val_loss": history["val_loss"][-1],
      "val_acc": history["val_acc"][-1],
      "steps_per_s": (cfg.steps - 1) / train_time if cfg.steps > 1 else float("nan"),
      "tokens_per_s": (cfg.steps - 1) * tokens_per_step / train_time if cfg.steps > 1 else float("nan"),
      "params": param_count(model),
      "history": history,
  }
  return model, results


# ----------------------------------------------------------------------------
# Checkpoints (flax.serialization msgpack; see the module docstring).
# ----------------------------------------------------------------------------


def _flat_state(model):
  return {"/".join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(model))}


def save_checkpoint(path: str, model: GPT, *, tokenizer: CharTokenizer | None = None,
                    extra: dict | None = None) -> None:
  """Writes model state (all variables, incl. fixed sketches) + config to one file."""
  payload = {
      "config": model.config.to_json(),
      "tokenizer": tokenizer.to_json() if tokenizer is not None else "",
      "extra": json.dumps(extra or {}),
      "state": _flat_state(model),
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(payload))
  os.replace(tmp, path)


def load_checkpoint(path: str):
  """Returns (model, tokenizer or None, extra dict)."""
  with open(path, "rb") as f:
    payload = serialization.msgpack_restore(f.read())
  config = GPTConfig.from_json(payload["config"])
  model = GPT(config, rngs=nnx.Rngs(0))
  flat = nnx.to_flat_state(nnx.state(model))
  saved = payload["state"]
  keys = {"/".join(map(str, p)) for p, _ in flat}
  if keys != set(saved):
    raise ValueError(f"checkpoint does not match the model: missing {sorted(keys - set(saved))[:5]}, "
                     f"unexpected {sorted(set(saved) - keys)[:5]}")
  for p, v in flat:
    arr = saved["/".join(map(str, p))]
    if arr.shape != v.shape:
      raise ValueError(f"{p}: checkpoint shape {arr.shape}, model {v.shape}")
    v[...] = jnp.asarray(arr, v.dtype)
  tok = CharTokenizer.from_json(payload["tokenizer"]) if payload["tokenizer"] else None
  return model, tok, json.loads(payload["extra"])


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _bool(s: str) -> bool:
  if s.lower() in ("1", "true", "yes", "on"):
    return True
  if s.lower() in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _separator(s: str) -> str:
  """The --pack-separator string with backslash escapes (\\n, \\t, \\\\) read."""
  try:
    s = s.encode("latin-1", "backslashreplace").decode("unicode_escape")
  except UnicodeDecodeError as e:
    raise argparse.ArgumentTypeError(f"bad escape in {s!r}: {e}") from None
  if not s:
    raise argparse.ArgumentTypeError("must be a non-empty string")
  return s


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m pallas_polysketch.train",
      description="Train a small PolySketchFormer LM. Without --data: a synthetic "
                  "long-range associative-recall demo (minutes on 2 CPU cores).")
  p.add_argument("--data", help="UTF-8 text file (character level, 90/10 split); "
                 "default: the synthetic recall task")
  p.add_argument("--pack-separator", type=_separator, default=None, metavar="STR",
                 help="with --data: the text is documents split by STR (backslash escapes "
                      "such as \\n are read); rows pack documents with segment ids, attention "
                      "and rotary positions stay inside each document")
  p.add_argument("--attention", default="polysketch", choices=["polysketch", "polynomial", "softmax"])
  p.add_argument("--sketch", default="learned", choices=["learned", "random"])
  p.add_argument("--sketch-dim", type=int, default=16,
                 help="sketch size r (default 16 keeps the demo to minutes on 2 CPU cores; "
                      "the layer's default and the paper's is 32)")
  p.add_argument("--degree", type=int, default=4)
  p.add_argument("--block-size", type=int, default=None,
                 help="polysketch block size (default: context/4, at least 8)")
  p.add_argument("--local-exact", type=_bool, default=True)
  p.add_argument("--implementation", default=None, choices=[None, "xla", "pallas"])
  p.add_argument("--pairs", type=int, default=8,
                 help="synthetic task: key/value pairs at the start of each sequence")
  p.add_argument("--queries", type=int, default=16,
                 help="synthetic task: queries at the end of each sequence")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--context", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--weight-decay", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--checkpoint", default=None, help="write params here (msgpack) at the end")
  p.add_argument("--results", default=None, help="write results + history JSON here")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--sample", type=int, default=200,
                 help="with --data: characters to sample at the end (0: none)")
  return p


def main(argv=None) -> dict:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.pack_separator is not None and not args.data:
    parser.error("--pack-separator needs --data")
  if args.data:
    data = TextData.from_file(args.data, separator=args.pack_separator)
    tokenizer = data.tokenizer
    packed = (f", {data.num_documents:,} documents packed by {args.pack_separator!r}"
              if args.pack_separator is not None else "")
    print(f"data: {args.data}: {len(data.train_ids):,} train / {len(data.val_ids):,} val chars, "
          f"vocab {data.vocab_size}{packed}")
  else:
    data = RecallData(num_pairs=args.pairs, num_queries=args.queries)
    tokenizer = None
    print(f"data: synthetic associative recall, {data.num_pairs} key/value pairs at the start, "
          f"{data.num_queries} queries at the end of each {args.context}-token sequence; "
          f"loss on answers only (chance: {math.log(data.num_values):.3f})")
  block_size = args.block_size or max(8, (args.context // 4) // 8 * 8)
  model_config = GPTConfig(
      vocab_size=data.vocab_size, num_layers=args.layers, num_heads=args.heads,
      embed_dim=args.dim, attention=args.attention, sketch=args.sketch,
      sketch_dim=args.sketch_dim, degree=args.degree, block_size=block_size,
      local_exact=args.local_exact, implementation=args.implementation)
  cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, context=args.context,
                    learning_rate=args.lr, warmup_steps=args.warmup,
                    weight_decay=args.weight_decay, seed=args.seed,
                    eval_every=args.eval_every, eval_batches=args.eval_batches)
  model, results = train(model_config, data, cfg, progress=not args.no_progress, log=print)
  print(f"final val loss {results['val_loss']:.4f}  val acc {results['val_acc']:.3f}  "
        f"({results['steps_per_s']:.2f} steps/s, {results['tokens_per_s']:,.0f} tokens/s, "
        f"{results['params']:,} params)")
  if args.checkpoint:
    save_checkpoint(args.checkpoint, model, tokenizer=tokenizer,
                    extra={"val_loss": results["val_loss"], "steps": cfg.steps})
    print(f"checkpoint: {args.checkpoint}")
  if args.results:
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
      json.dump({"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(cfg),
                 **results}, f, indent=1)
  if args.data and args.sample > 0:
    from pallas_polysketch.models.gpt import generate
    prompt = tokenizer.encode("\n")
    out = generate(model, prompt, args.sample, key=jax.random.key(args.seed),
                   temperature=0.8, context=args.context)
    print("sample:\n" + tokenizer.decode(out))
  return results


if __name__ == "__main__":
  main()
