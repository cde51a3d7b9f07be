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
With --polynomial-warmup N a polysketch model trains its first N steps with
the exact polynomial attention its sketch approximates (same parameters), then
with the sketch (`TrainConfig.polynomial_warmup_steps`).

Evaluation: every --eval-every steps (and at the last) the script prints the
train loss (mean since the previous evaluation), the held-out loss and
accuracy, the throughput in tokens/s (train steps since the previous
evaluation, leaving out each session's first, compiling step) and the elapsed
wall time.

Checkpoints (--checkpoint DIR): an orbax `CheckpointManager` directory, one
step directory per evaluation (the last 2 kept), each holding

  state/   the model (params and the fixed random sketches) and the
           optimizer (AdamW moments, counts, step) as an orbax PyTree
  meta/    JSON: model and train configs, tokenizer, step, val loss, and the
           loop's own state (data RNG, loss histories, timers, and what the
           data was: the text's hash, split and separator, or the recall task)

so `--resume` continues a run exactly where it stopped: the same batches and
the same losses as an uninterrupted run (it refuses other flags or other
data, before any work; decoding caches are never saved). Beside the step directories,
`train_log.json` holds one record per evaluation (step, train_loss, val_loss,
val_acc, tokens_per_s, elapsed_s, exact_polynomial) and `loss.png` the loss curves (when
matplotlib is installed; otherwise the script says so and skips the plot).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from pallas_polysketch import _validation
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

  def signature(self) -> dict:
    """What a resumed run must train on again (`train`'s resume_from check):
    the separator, the split's sizes and a hash of the token ids."""
    digest = hashlib.sha256(np.ascontiguousarray(self.train_ids, np.int64).tobytes())
    digest.update(np.ascontiguousarray(self.val_ids, np.int64).tobytes())
    return {"kind": "text", "separator": self.separator, "train_tokens": int(len(self.train_ids)),
            "val_tokens": int(len(self.val_ids)), "sha256": digest.hexdigest()}

  @classmethod
  def from_file(cls, path: str, **kwargs) -> "TextData":
    """TextData of a UTF-8 text file; kwargs as for the constructor."""
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

    noise ... | k1 v1 k2 v2 ... kn vn 0 | noise ... | q1 a1 q2 a2 ... qm am

  with n distinct keys, random values, queries drawn (with repeats) from the n
  keys and a_i the value paired with q_i. Targets are next tokens; the loss
  mask keeps only answer positions (predicting a_i at q_i), so chance level is
  log(V).

  Validation sequences put the pairs at the very start, the farthest from the
  queries, and score only each key's first query: a repeated query can be
  answered from its earlier answer nearby, without retrieving from the pairs.
  Training sequences score every answer and, with `random_offset`, put the
  pairs at a uniformly random offset into the noise: the spread of distances
  is a curriculum. Without it a 2-layer softmax model stayed for 10k steps on
  the plateau of guessing among the values in context (T = 32, 4 pairs, 4
  queries); with it, it learns T = 64, 4 pairs in about 1200 steps
  (`bench/LM_QUALITY.md`).

  With `distinct_queries` each sequence queries num_queries different keys of
  its pairs (as Zoology's MQAR queries every key once): no answer can then be
  copied from an earlier query's answer, in training either, so the loss
  rewards only retrieval from the pairs. It needs num_queries <= num_pairs.
  """

  def __init__(self, num_keys: int = 16, num_values: int = 16, num_noise: int = 16,
               num_pairs: int = 8, num_queries: int = 16, seed: int = 1234,
               random_offset: bool = True, distinct_queries: bool = False):
    self.num_keys, self.num_values, self.num_noise = num_keys, num_values, num_noise
    self.num_pairs, self.num_queries = num_pairs, num_queries
    self.random_offset = bool(random_offset)
    self.distinct_queries = bool(distinct_queries)
    self.vocab_size = 1 + num_keys + num_values + num_noise
    self.val_seed = seed
    for name, value in (("num_keys", num_keys), ("num_values", num_values),
                        ("num_pairs", num_pairs), ("num_queries", num_queries)):
      if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if num_noise < 1:
      raise ValueError(f"num_noise must be >= 1, got {num_noise}")
    if num_pairs > num_keys:
      raise ValueError(f"num_pairs={num_pairs} must be <= num_keys={num_keys}")
    if distinct_queries and num_queries > num_pairs:
      raise ValueError(f"distinct_queries: num_queries={num_queries} must be <= "
                       f"num_pairs={num_pairs} (each query a different key)")

  def signature(self) -> dict:
    """What a resumed run must train on again (`TextData.signature`)."""
    return {"kind": "recall", "num_keys": self.num_keys, "num_values": self.num_values,
            "num_noise": self.num_noise, "num_pairs": self.num_pairs,
            "num_queries": self.num_queries, "val_seed": self.val_seed,
            "random_offset": self.random_offset, "distinct_queries": self.distinct_queries}

  @property
  def min_context(self) -> int:
    """The shortest context that holds the pairs, their separator and the queries."""
    return 2 * (self.num_pairs + self.num_queries) + 1

  def _make(self, rng: np.random.Generator, batch_size: int, context: int, *, validation: bool):
    n, m = self.num_pairs, self.num_queries
    if self.min_context > context:
      raise ValueError(f"context {context} too short for {n} pairs and {m} queries "
                       f"(needs >= {self.min_context})")
    keys = np.argsort(rng.random((batch_size, self.num_keys)), axis=1)[:, :n] + 1
    vals = rng.integers(0, self.num_values, (batch_size, n)) + 1 + self.num_keys
    seq = rng.integers(0, self.num_noise, (batch_size, context + 1)) + 1 + self.num_keys + self.num_values
    q_start = context + 1 - 2 * m
    rows = np.arange(batch_size)[:, None]
    if self.random_offset and not validation:
      offset = rng.integers(0, q_start - 2 * n, batch_size)   # the separator fits before q1
    else:
      offset = np.zeros(batch_size, np.int64)
    at = offset[:, None] + 2 * np.arange(n)
    seq[rows, at], seq[rows, at + 1] = keys, vals
    seq[rows[:, 0], offset + 2 * n] = 0
    if self.distinct_queries:
      which = np.argsort(rng.random((batch_size, n)), axis=1)[:, :m]
    else:
      which = rng.integers(0, n, (batch_size, m))
    seq[:, q_start::2] = keys[rows, which]
    seq[:, q_start + 1::2] = vals[rows, which]
    mask = np.zeros((batch_size, context), np.float32)
    if validation:   # each key's first query only
      first = np.zeros((batch_size, m), bool)
      for i in range(m):
        first[:, i] = ~(which[:, :i] == which[:, i:i + 1]).any(axis=1)
      mask[:, q_start::2] = first
    else:
      mask[:, q_start::2] = 1.0  # position of q_i predicts a_i
    return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32), mask

  def train_batch(self, rng, batch_size, context):
    return self._make(rng, batch_size, context, validation=False)

  def val_batches(self, num_batches, batch_size, context):
    rng = np.random.default_rng(self.val_seed)
    return [self._make(rng, batch_size, context, validation=True) for _ in range(num_batches)]


# ----------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class TrainConfig:
  """Training hyperparameters (`train`).

  polynomial_warmup_steps: for a "polysketch" model, its first this many steps
    (and the evaluations among them) compute the exact polynomial attention
    the sketch approximates, with the same parameters (`GPT.__call__`'s
    exact_polynomial: O(context^2)), and the sketch takes over after them; one
    optimizer and learning-rate schedule throughout. The learned sketch stays
    as initialised during the warm-up (no weight decay either). Models that
    did not learn to retrieve through the sketch from scratch did after such
    a warm-up (bench/LM_QUALITY.md, MQAR). 0: none.
  """
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
  polynomial_warmup_steps: int = 0

  def __post_init__(self):
    # eval_every=0 failed at the first step (a modulo by zero), eval_batches=0
    # reported a NaN validation loss, steps=0 was blamed on the warm-up; a NaN
    # learning rate failed at the first step, a negative one trained by
    # gradient ascent, a negative warmup_steps was taken as 1.
    for name in ("steps", "batch_size", "context", "eval_every", "eval_batches", "log_every"):
      _validation.check_positive_int(name, getattr(self, name))
    for name in ("warmup_steps", "polynomial_warmup_steps", "seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    for name, low, high, open_low in (("learning_rate", 0.0, None, False),
                                      ("clip_norm", 0.0, None, True),
                                      ("weight_decay", 0.0, None, False),
                                      ("min_lr_ratio", 0.0, 1.0, False)):
      value = getattr(self, name)
      ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
            and np.isfinite(value) and (value > low if open_low else value >= low)
            and (high is None or value <= high))
      if not ok:
        allowed = (f"in [{low}, {high}]" if high is not None else
                   f"{'>' if open_low else '>='} {low}")
        raise ValueError(f"{name} must be a finite number {allowed}, got {value!r}")


def loss_fn(model, inputs, targets, mask, segment_ids=None, exact_polynomial=False):
  """(mean cross-entropy, accuracy) over the targets mask keeps: inputs and
  targets int [batch, context], mask float [batch, context], segment_ids None
  or int32 [batch, context]."""
  logits = model(inputs, segment_ids=segment_ids, exact_polynomial=exact_polynomial)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  denom = jnp.maximum(jnp.sum(mask), 1.0)
  loss = jnp.sum(losses * mask) / denom
  acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / denom
  return loss, acc


def make_optimizer(model, cfg: TrainConfig):
  """AdamW (b2 0.95) after global-norm clipping, with linear warm-up and cosine
  decay to learning_rate * min_lr_ratio, over the model's `nnx.Param`s."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=max(1, min(cfg.warmup_steps, cfg.steps - 1)),
      decay_steps=max(cfg.steps, 2), end_value=cfg.learning_rate * cfg.min_lr_ratio)
  tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                   optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


_SKETCH_PARAMS = nnx.All(nnx.Param, nnx.PathContains("sketch"))


def make_steps(model, optimizer):
  """Jitted functional train/eval steps over (graphdef, state).

  Both take `exact_polynomial` (static, default False): the model's attention
  computed exactly (`GPT.__call__`), for `TrainConfig.polynomial_warmup_steps`;
  a train step so leaves the learned sketch's parameters as they were.
  """
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, static_argnames="exact_polynomial")
  def train_step(state, inputs, targets, mask, segment_ids=None, *, exact_polynomial=False):
    model, optimizer = nnx.merge(graphdef, state)
    (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
        model, inputs, targets, mask, segment_ids, exact_polynomial)
    idle = nnx.to_pure_dict(nnx.state(model, _SKETCH_PARAMS)) if exact_polynomial else None
    optimizer.update(model, grads)
    if idle is not None:   # unused, so no gradient; AdamW's weight decay would still shrink it
      sketch = nnx.state(model, _SKETCH_PARAMS)
      nnx.replace_by_pure_dict(sketch, idle)
      nnx.update(model, sketch)
    return nnx.state((model, optimizer)), loss, acc

  @functools.partial(jax.jit, static_argnames="exact_polynomial")
  def eval_step(state, inputs, targets, mask, segment_ids=None, *, exact_polynomial=False):
    model, _ = nnx.merge(graphdef, state)
    return loss_fn(model, inputs, targets, mask, segment_ids, exact_polynomial)

  return graphdef, state, train_step, eval_step


def evaluate(eval_step, state, batches, exact_polynomial=False):
  """(mean loss, mean accuracy) of eval_step (`make_steps`) over batches."""
  losses, accs = [], []
  for batch in batches:
    loss, acc = eval_step(state, *batch, exact_polynomial=exact_polynomial)
    losses.append(float(loss))
    accs.append(float(acc))
  return float(np.mean(losses)), float(np.mean(accs))


def train(model_config: GPTConfig, data, cfg: TrainConfig, *, progress: bool = True,
          log: Callable[[str], None] | None = None, checkpoint_dir: str | None = None,
          resume_from: Checkpoint | None = None, init_from: Checkpoint | None = None):
  """Trains a GPT on `data` (TextData or RecallData). Returns (model, results dict).

  checkpoint_dir: if given, an orbax checkpoint (model, optimizer, step and the
    loop's state) is written there at every evaluation, the last
    KEEP_CHECKPOINTS kept, beside `train_log.json` and `loss.png` (module
    docstring). It must hold no checkpoint after `resume_from`'s step (none at
    all when not resuming).
  resume_from: a `Checkpoint` that `train` wrote (`load_checkpoint`): training
    continues after its step with its model, optimizer state, data RNG and
    histories, and gives the same losses as an uninterrupted run. Its model
    config must equal `model_config` and its train config `cfg` (eval_every,
    eval_batches and log_every may differ).
  init_from: a `Checkpoint` (`load_checkpoint`) whose model's variables (the
    parameters and the fixed random sketches) start this training, with a
    fresh optimizer and schedule from step 0: fine-tuning, e.g. at a longer
    context than the checkpoint trained at. Its model config must equal
    `model_config` and its tokenizer (if saved) the data's; the data order still
    follows cfg.seed. Not with resume_from.

  results: final val loss/accuracy, steps/s and tokens/s (over the train steps
  after each session's first, compiling one, and after the polynomial
  warm-up), elapsed_s, `history` (train loss per log window, val loss per
  evaluation) and `evals` (the train_log.json records: step, train_loss,
  val_loss, val_acc, tokens_per_s (the steps since the previous evaluation,
  in whichever mode), elapsed_s, and exact_polynomial: whether the step's
  attention was the warm-up's).
  """
  log = log or (lambda s: None)
  warmup = cfg.polynomial_warmup_steps
  if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup < cfg.steps:
    raise ValueError(f"polynomial_warmup_steps must be an int in [0, steps = {cfg.steps}), "
                     f"got {warmup!r}")
  if warmup and model_config.attention != "polysketch":
    raise ValueError("polynomial_warmup_steps needs attention='polysketch' (the exact "
                     f"polynomial attention is what its sketch approximates), got "
                     f"attention={model_config.attention!r}")
  tokenizer = getattr(data, "tokenizer", None)
  data_signature = _data_signature(data)   # a hash of the whole text: once
  if init_from is not None:
    if resume_from is not None:
      raise ValueError("train: give resume_from (continue a run) or init_from (start a new run "
                       "from a model's weights), not both")
    _check_model_config("init_from", init_from, model_config, tokenizer)
  if resume_from is None:
    rng = np.random.default_rng(cfg.seed)
    model = GPT(model_config, rngs=nnx.Rngs(cfg.seed))
    if init_from is not None:
      nnx.update(model, jax.tree.map(jnp.copy, nnx.state(init_from.model)))
    optimizer = make_optimizer(model, cfg)
    start = 0
    loop = {"history": {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "val_acc": []},
            "evals": [], "window": [], "eval_window": [], "elapsed_s": 0.0,
            "train_time": 0.0, "timed_steps": 0, "data": data_signature}
  else:
    _check_resume(resume_from, model_config, cfg, tokenizer, data_signature)
    model, optimizer, start = resume_from.model, resume_from.optimizer, resume_from.step
    loop = json.loads(json.dumps(resume_from.loop_state))  # a deep copy
    loop.setdefault("data", data_signature)
    rng = np.random.default_rng()
    rng.bit_generator.state = loop.pop("data_rng")
  history, evals = loop["history"], loop["evals"]
  manager = None
  if checkpoint_dir is not None:
    manager = _manager(checkpoint_dir, max_to_keep=KEEP_CHECKPOINTS)
    later = [s for s in manager.all_steps() if s > start]
    if later:
      manager.close()
      raise ValueError(f"checkpoint_dir {checkpoint_dir!r} already holds checkpoints for steps "
                       f"{sorted(later)}" + (f", after the resumed step {start}" if resume_from else "")
                       + "; resume from its latest (--resume) or pick another directory")
  graphdef, state, train_step, eval_step = make_steps(model, optimizer)
  val = data.val_batches(cfg.eval_batches, cfg.batch_size, cfg.context)
  log(f"model: {param_count(model):,} params, {model_config}")
  if resume_from is not None:
    log(f"resumed at step {start} of {cfg.steps}")

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

  def emit(msg):  # through tqdm, so the bar is redrawn below the line
    if bar is None:
      log(msg)
    else:
      with bar.external_write_mode():
        log(msg)

  tokens_per_step = cfg.batch_size * cfg.context
  t_start = time.perf_counter() - loop["elapsed_s"]
  interval_time, interval_steps = 0.0, 0  # timed train steps since the last evaluation
  plot_note = [True]
  try:
    for step in range(start + 1, cfg.steps + 1):
      batch = data.train_batch(rng, cfg.batch_size, cfg.context)
      t0 = time.perf_counter()
      exact = step <= warmup
      state, loss, acc = train_step(state, *batch, exact_polynomial=exact)
      loss = float(loss)
      if step not in (start + 1, warmup + 1):  # the session's first steps in each mode compile
        dt = time.perf_counter() - t0
        if not exact:   # the model's own speed: the sketch's steps
          loop["train_time"] += dt
          loop["timed_steps"] += 1
        interval_time += dt
        interval_steps += 1
      if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}")
      loop["window"].append(loss)
      loop["eval_window"].append(loss)
      if step % cfg.log_every == 0 or step == cfg.steps:
        history["step"].append(step)
        history["train_loss"].append(float(np.mean(loop["window"])))
        loop["window"] = []
      if bar is not None:
        tok_s = loop["timed_steps"] * tokens_per_step / loop["train_time"] if loop["timed_steps"] else 0.0
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        bar.update(1)
      if step % cfg.eval_every == 0 or step == cfg.steps:
        vloss, vacc = evaluate(eval_step, state, val, exact)
        record = {
            "step": step,
            "train_loss": float(np.mean(loop["eval_window"])),
            "val_loss": vloss,
            "val_acc": vacc,
            "tokens_per_s": (interval_steps * tokens_per_step / interval_time
                             if interval_steps else None),
            "elapsed_s": time.perf_counter() - t_start,
            "exact_polynomial": exact,
        }
        evals.append(record)
        history["val_step"].append(step)
        history["val_loss"].append(vloss)
        history["val_acc"].append(vacc)
        loop["eval_window"], loop["elapsed_s"] = [], record["elapsed_s"]
        interval_time, interval_steps = 0.0, 0
        tok = "n/a" if record["tokens_per_s"] is None else f"{record['tokens_per_s']:,.0f}"
        emit(f"step {step}: train {record['train_loss']:.4f}  val {vloss:.4f}  "
             f"val_acc {vacc:.3f}  tok/s {tok}  {record['elapsed_s']:.1f}s"
             + ("  (exact polynomial warm-up)" if exact else ""))
        if manager is not None:
          model, optimizer = nnx.merge(graphdef, state)
          _save(manager, step, model, optimizer, _meta(
              model, step, optimizer=optimizer, tokenizer=tokenizer, train_config=cfg,
              extra={"val_loss": vloss, "val_acc": vacc},
              loop_state={**loop, "data_rng": rng.bit_generator.state}))
          write_train_log(os.path.join(checkpoint_dir, LOG_NAME), model_config, cfg, evals)
          if not write_loss_plot(os.path.join(checkpoint_dir, PLOT_NAME), history, evals,
                                 title=f"{model_config.attention}, {param_count(model):,} params"):
            if plot_note[0]:
              emit(f"note: matplotlib is not installed; {PLOT_NAME} is not written")
              plot_note[0] = False
  finally:
    if bar is not None:
      bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  model, _ = nnx.merge(graphdef, state)
  timed, train_time = loop["timed_steps"], loop["train_time"]
  results = {
      "val_loss": history["val_loss"][-1],
      "val_acc": history["val_acc"][-1],
      "steps_per_s": timed / train_time if timed else float("nan"),
      "tokens_per_s": timed * tokens_per_step / train_time if timed else float("nan"),
      "elapsed_s": loop["elapsed_s"],
      "params": param_count(model),
      "history": history,
      "evals": evals,
  }
  return model, results


def _check_model_config(name: str, ckpt: Checkpoint, model_config: GPTConfig, tokenizer):
  """The checkpoint's model config and tokenizer (where both sides have one) are the run's."""
  saved = ckpt.model.config
  if saved != model_config:
    diff = {f.name: (getattr(saved, f.name), getattr(model_config, f.name))
            for f in dataclasses.fields(GPTConfig)
            if getattr(saved, f.name) != getattr(model_config, f.name)}
    raise ValueError(f"{name}: the checkpoint's model config differs (checkpoint, given): {diff}")
  if tokenizer is not None and ckpt.tokenizer is not None and tokenizer.chars != ckpt.tokenizer.chars:
    raise ValueError(f"{name}: the checkpoint's tokenizer differs from the data's")


def _data_signature(data) -> dict | None:
  signature = getattr(data, "signature", None)
  return signature() if callable(signature) else None


def _check_resume(ckpt: Checkpoint, model_config: GPTConfig, cfg: TrainConfig, tokenizer,
                  data_signature: dict | None = None):
  if ckpt.optimizer is None or ckpt.loop_state is None:
    raise ValueError(f"resume_from: the checkpoint at step {ckpt.step} holds no optimizer state "
                     "or no training-loop state (only checkpoints written by train() resume)")
  _check_model_config("resume_from", ckpt, model_config, tokenizer)
  free = {"eval_every", "eval_batches", "log_every"}
  diff = {f.name: (getattr(ckpt.train_config, f.name), getattr(cfg, f.name))
          for f in dataclasses.fields(TrainConfig)
          if f.name not in free and getattr(ckpt.train_config, f.name) != getattr(cfg, f.name)}
  if diff:
    raise ValueError(f"resume_from: the checkpoint's train config differs (checkpoint, given): {diff}")
  # Checkpoints from before the data was recorded hold none.
  saved = ckpt.loop_state.get("data")
  if saved is not None and data_signature is not None and saved != data_signature:
    diff = {key: (saved.get(key), data_signature.get(key))
            for key in sorted(set(saved) | set(data_signature))
            if saved.get(key) != data_signature.get(key)}
    raise ValueError("resume_from: the checkpointed run trained on other data (checkpoint, "
                     f"given): {diff}")


# ----------------------------------------------------------------------------
# Training log and loss plot.
# ----------------------------------------------------------------------------

LOG_NAME, PLOT_NAME = "train_log.json", "loss.png"


def write_train_log(path: str, model_config: GPTConfig, cfg: TrainConfig, evals: list) -> None:
  """Writes {"model": config, "train": config, "evals": [one record per evaluation]}."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(cfg),
               "evals": evals}, f, indent=1)
  os.replace(tmp, path)


def write_loss_plot(path: str, history: dict, evals: list, *, title: str = "") -> bool:
  """Plots train loss (per log window) and val loss (per evaluation) against step.

  Uses matplotlib's Agg canvas directly (the global pyplot backend is left
  alone). Returns False, writing nothing, when matplotlib is not installed.
  """
  try:
    import matplotlib  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    return False
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.plot(history["step"], history["train_loss"], marker="." if len(history["step"]) < 50 else None,
          label="train (mean per log window)")
  ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  tok = [e["tokens_per_s"] for e in evals if e["tokens_per_s"] is not None]
  ax.set_title(title + (f"  ({tok[-1]:,.0f} tokens/s)" if tok else ""))
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return True


# ----------------------------------------------------------------------------
# Checkpoints (orbax; see the module docstring).
# ----------------------------------------------------------------------------

KEEP_CHECKPOINTS = 2  # train() keeps the last 2 evaluations' checkpoints
CHECKPOINT_FORMAT = 1


@dataclasses.dataclass
class Checkpoint:
  """What `load_checkpoint` returns.

  model: the GPT built from the saved config, every variable restored
    (parameters and the fixed random sketches).
  optimizer: an `nnx.Optimizer` (make_optimizer with the saved train config)
    holding the saved AdamW state and step, or None if none was saved.
  step: the training step the checkpoint was written at.
  tokenizer, train_config: as saved, or None.
  extra: the JSON dict given to save_checkpoint (train writes val_loss, val_acc).
  loop_state: train()'s own state for `resume_from` (data RNG, histories,
    timers), or None for checkpoints written by save_checkpoint.
  """
  model: GPT
  optimizer: nnx.Optimizer | None
  step: int
  tokenizer: CharTokenizer | None
  train_config: TrainConfig | None
  extra: dict
  loop_state: dict | None = None


def _manager(directory: str, *, max_to_keep: int | None = None, create: bool = True):
  if os.path.exists(directory) and not os.path.isdir(directory):
    # orbax took it and failed at the first save, after the steps before it.
    raise ValueError(f"checkpoint directory {directory!r} is a file, not a directory")
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def _tree(model, optimizer) -> dict:
  """The saved arrays: every variable but decoding caches (`GPT.init_cache`),
  which a model built from its config does not have."""
  no_cache = nnx.Not(nnx.Cache)
  tree = {"model": nnx.to_pure_dict(nnx.state(model, no_cache))}
  if optimizer is not None:
    tree["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer, no_cache))
  return tree


def _meta(model, step, *, optimizer, tokenizer, train_config, extra, loop_state=None) -> dict:
  """The checkpoint's JSON item, as a deep copy (an asynchronous save may write it later)."""
  return json.loads(json.dumps({
      "format": CHECKPOINT_FORMAT,
      "step": int(step),
      "model_config": dataclasses.asdict(model.config),
      "train_config": dataclasses.asdict(train_config) if train_config is not None else None,
      "tokenizer": list(tokenizer.chars) if tokenizer is not None else None,
      "has_optimizer": optimizer is not None,
      "extra": dict(extra or {}),
      "loop_state": loop_state,
  }))


def _save(manager, step: int, model, optimizer, meta: dict) -> None:
  """Starts an (asynchronous) save of model + optimizer state and meta at `step`."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_tree(model, optimizer)),
                                             meta=ocp.args.JsonSave(meta)))


def checkpoint_steps(directory: str) -> list[int]:
  """The steps with a checkpoint in `directory`, ascending ([] if it does not exist)."""
  if not os.path.isdir(directory):
    return []
  manager = _manager(directory, create=False)
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def save_checkpoint(directory: str, model: GPT, optimizer: nnx.Optimizer | None = None, *,
                    step: int = 0, tokenizer: CharTokenizer | None = None,
                    train_config: TrainConfig | None = None, extra: dict | None = None) -> None:
  """Writes an orbax checkpoint of `model` (and `optimizer`) as step `step` of `directory`.

  Every model variable is saved (params and the fixed random sketches), the
  optimizer's whole state (AdamW moments, counts, step), and as JSON the model
  config, `train_config` (needed with an optimizer: load_checkpoint rebuilds
  the optimizer from it), the tokenizer and `extra`. `directory` may hold
  other steps, not this one.
  """
  if optimizer is not None and train_config is None:
    raise ValueError("save_checkpoint: train_config is required with an optimizer "
                     "(load_checkpoint rebuilds the optimizer from it)")
  if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
    raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
  manager = _manager(directory)
  try:
    if step in manager.all_steps():
      raise ValueError(f"save_checkpoint: {directory!r} already holds a checkpoint for step {step}")
    _save(manager, int(step), model, optimizer,
          _meta(model, step, optimizer=optimizer, tokenizer=tokenizer,
                train_config=train_config, extra=extra))
    manager.wait_until_finished()
  finally:
    manager.close()


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _check_tree(saved, target, where: str) -> None:
  """Raises ValueError unless the saved arrays' names, shapes and dtypes match `target`."""
  saved_flat = {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  want = {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing, unexpected = sorted(set(want) - set(saved_flat)), sorted(set(saved_flat) - set(want))
  if missing or unexpected:
    raise ValueError(f"{where} does not match the model built from its config: "
                     f"missing {missing[:5]}, unexpected {unexpected[:5]}")
  for name, v in want.items():
    s = saved_flat[name]
    if tuple(s.shape) != tuple(v.shape) or np.dtype(s.dtype) != np.dtype(v.dtype):
      raise ValueError(f"{where}: {name} is {s.dtype}{list(s.shape)} in the checkpoint, "
                       f"{v.dtype}{list(v.shape)} in the model")


def _assign(obj, pure: dict) -> None:
  state = nnx.state(obj)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(obj, state)


def load_checkpoint(directory: str, *, step: int | None = None) -> Checkpoint:
  """Restores the checkpoint at `step` (default: the latest) of an orbax directory.

  Returns a `Checkpoint` whose model (and optimizer) are bit-for-bit the saved
  ones. Raises FileNotFoundError if there is no such checkpoint, ValueError if
  the saved arrays do not fit the model its config builds.
  """
  if os.path.isfile(directory):
    raise ValueError(f"load_checkpoint: {directory!r} is a file; checkpoints are orbax "
                     "directories (single-file msgpack checkpoints are no longer read)")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"load_checkpoint: no checkpoint directory {directory!r}")
  manager = _manager(directory, create=False)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"load_checkpoint: no checkpoint in {directory!r}")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"load_checkpoint: no checkpoint for step {step} in {directory!r} "
                              f"(it holds steps {steps})")
    where = f"checkpoint {directory!r} step {step}"
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
      raise ValueError(f"{where}: unknown format (expected {CHECKPOINT_FORMAT}, "
                       f"got {meta.get('format') if isinstance(meta, dict) else meta!r})")
    model = GPT(GPTConfig(**meta["model_config"]), rngs=nnx.Rngs(0))
    train_config = TrainConfig(**meta["train_config"]) if meta["train_config"] else None
    optimizer = make_optimizer(model, train_config) if meta["has_optimizer"] else None
    target = _tree(model, optimizer)
    _check_tree(manager.item_metadata(step)["state"], target, where)
    state = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  finally:
    manager.close()
  _assign(model, state["model"])
  if optimizer is not None:
    _assign(optimizer, state["optimizer"])
  tokenizer = CharTokenizer(meta["tokenizer"]) if meta["tokenizer"] is not None else None
  return Checkpoint(model=model, optimizer=optimizer, step=int(meta["step"]), tokenizer=tokenizer,
                    train_config=train_config, extra=meta["extra"], loop_state=meta["loop_state"])


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
  p.add_argument("--sketch-hidden", type=int, default=None,
                 help="the learned sketch's hidden width (default 8 x --sketch-dim, the paper's; "
                      "narrower is cheaper and a different model)")
  p.add_argument("--degree", type=int, default=4)
  p.add_argument("--block-size", type=int, default=None,
                 help="polysketch block size (default: context/4, at least 8)")
  p.add_argument("--local-exact", type=_bool, default=True)
  p.add_argument("--implementation", default=None, choices=["xla", "pallas"],
                 help="the attention's implementation (default: the platform's fastest)")
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
  p.add_argument("--polynomial-warmup", type=int, default=0, metavar="STEPS",
                 help="with --attention polysketch: the first STEPS steps compute the exact "
                      "polynomial attention (same parameters, O(context^2)), then the sketch")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--checkpoint", default=None, metavar="DIR",
                 help="orbax checkpoint directory: model, optimizer state and step saved at "
                      "every evaluation (the last 2 kept), with train_log.json and loss.png")
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --checkpoint DIR (a fresh start "
                      "if it holds none); the other flags must match the checkpointed run")
  p.add_argument("--results", default=None, help="write results + history JSON here")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--sample", type=int, default=200,
                 help="with --data: characters to sample at the end (0: none)")
  return p


# TrainConfig / GPTConfig fields (and the layer's argument names) -> flags.
_FLAGS = {"learning_rate": "--lr", "warmup_steps": "--warmup",
          "polynomial_warmup_steps": "--polynomial-warmup", "num_layers": "--layers",
          "num_heads": "--heads", "embed_dim": "--dim", "in_features": "--dim",
          "sketch_hidden_dim": "--sketch-hidden", "hidden_dim": "--sketch-hidden"}
_FLAG_FIELDS = ("steps", "batch_size", "context", "eval_every", "eval_batches", "weight_decay",
                "seed", "sketch_dim", "degree", "block_size")


def _flag_names(message: str) -> str:
  """An error of TrainConfig, GPTConfig or the model with its fields named as
  the command line's flags ("num_heads (3)" -> "--heads (3)")."""
  names = {**{f: "--" + f.replace("_", "-") for f in _FLAG_FIELDS}, **_FLAGS}
  return re.sub(r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b",
                lambda m: names[m.group(1)], message)


def main(argv=None) -> dict:
  """`python -m pallas_polysketch.train`: parses argv (None: sys.argv), trains
  and returns the results dict of `train`."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.resume and not args.checkpoint:
    parser.error("--resume needs --checkpoint DIR")
  if args.pack_separator is not None and not args.data:
    parser.error("--pack-separator needs --data")
  try:   # the sizes are checked before any work (`TrainConfig`)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, context=args.context,
                      learning_rate=args.lr, warmup_steps=args.warmup,
                      weight_decay=args.weight_decay, seed=args.seed,
                      eval_every=args.eval_every, eval_batches=args.eval_batches,
                      polynomial_warmup_steps=args.polynomial_warmup)
  except ValueError as e:   # "eval_every must be ..." -> "--eval-every must be ..."
    parser.error(_flag_names(str(e)))
  if args.results and os.path.isdir(args.results):   # it was written after the training
    parser.error(f"--results {args.results} is a directory; give a file name for the JSON")
  if args.polynomial_warmup and args.attention != "polysketch":
    parser.error(f"--polynomial-warmup needs --attention polysketch, got {args.attention}")
  if not 0 <= args.polynomial_warmup < args.steps:
    parser.error(f"--polynomial-warmup must be in [0, --steps = {args.steps}), "
                 f"got {args.polynomial_warmup}")
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
  if not args.data and args.context < data.min_context:
    parser.error(f"--context {args.context} is shorter than the synthetic task's "
                 f"{data.min_context} tokens (--pairs {args.pairs}, --queries {args.queries})")
  block_size = (args.block_size if args.block_size is not None
                else max(8, (args.context // 4) // 8 * 8))
  try:   # the model's options, checked before any work by building it abstractly
    model_config = GPTConfig(
        vocab_size=data.vocab_size, num_layers=args.layers, num_heads=args.heads,
        embed_dim=args.dim, attention=args.attention, sketch=args.sketch,
        sketch_dim=args.sketch_dim, degree=args.degree, block_size=block_size,
        local_exact=args.local_exact, implementation=args.implementation,
        sketch_hidden_dim=args.sketch_hidden)
    nnx.eval_shape(lambda: GPT(model_config, rngs=nnx.Rngs(0)))
  except (ValueError, TypeError) as e:
    parser.error(_flag_names(str(e)))
  resume_from = None
  saved = checkpoint_steps(args.checkpoint) if args.checkpoint else []
  if saved and not args.resume:
    parser.error(f"--checkpoint {args.checkpoint} already holds checkpoints (steps {saved}): "
                 "pass --resume to continue from the latest, or pick another directory")
  if args.resume and saved:
    resume_from = load_checkpoint(args.checkpoint)
    try:   # before any work, with the flags named
      _check_resume(resume_from, model_config, cfg, tokenizer, _data_signature(data))
    except ValueError as e:
      parser.error(f"--resume from {args.checkpoint}: " + _flag_names(str(e)))
  elif args.resume:
    print(f"no checkpoint in {args.checkpoint}: starting from step 0")
  model, results = train(model_config, data, cfg, progress=not args.no_progress, log=print,
                         checkpoint_dir=args.checkpoint, resume_from=resume_from)
  print(f"final val loss {results['val_loss']:.4f}  val acc {results['val_acc']:.3f}  "
        f"({results['steps_per_s']:.2f} steps/s, {results['tokens_per_s']:,.0f} tokens/s, "
        f"{results['params']:,} params)")
  if args.checkpoint:
    print(f"checkpoint: {args.checkpoint} (log: {LOG_NAME}, plot: {PLOT_NAME})")
  if args.results:
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
      json.dump({"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(cfg),
                 **results}, f, indent=1)
  if args.data and args.sample > 0:
    from pallas_polysketch.models.gpt import generate
    # A new line where the text has one (a line start), else its first character.
    prompt = tokenizer.encode("\n") if "\n" in tokenizer.chars else data.train_ids[:1]
    out = generate(model, prompt, args.sample, key=jax.random.key(args.seed),
                   temperature=0.8, context=args.context)
    print("sample:\n" + tokenizer.decode(out))
  return results


if __name__ == "__main__":
  main()
