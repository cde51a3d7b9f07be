"""A small GPT-style decoder built on `PolySketchAttention`.

Pre-LayerNorm blocks (x + attn(LN(x)), x + mlp(LN(x))), a GELU MLP, a final
LayerNorm and tied input/output embeddings. Positions come from the rotary
embedding inside the attention layer (no absolute position table), so one
model runs at any context length.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_polysketch.nn import PolySketchAttention


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Model hyperparameters; `attention` ... `implementation` go to the layer."""
  vocab_size: int
  num_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 128
  mlp_ratio: int = 4
  num_kv_heads: int | None = None
  attention: str = "polysketch"
  sketch: str = "learned"
  sketch_dim: int = 32
  degree: int = 4
  block_size: int = 256
  local_exact: bool = True
  rope: bool = True
  implementation: str | None = None

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "GPTConfig":
    return cls(**json.loads(text))


class MLP(nnx.Module):

  def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
    self.up = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm decoder block."""

  def __init__(self, config: GPTConfig, *, dtype=None, rngs: nnx.Rngs):
    c = config
    self.ln1 = nnx.LayerNorm(c.embed_dim, dtype=dtype, rngs=rngs)
    self.attn = PolySketchAttention(
        c.embed_dim, c.num_heads, attention=c.attention,
        num_kv_heads=c.num_kv_heads, sketch=c.sketch, sketch_dim=c.sketch_dim,
        degree=c.degree, block_size=c.block_size, local_exact=c.local_exact,
        causal=True, rope=c.rope, dtype=dtype, implementation=c.implementation,
        rngs=rngs)
    self.ln2 = nnx.LayerNorm(c.embed_dim, dtype=dtype, rngs=rngs)
    self.mlp = MLP(c.embed_dim, c.mlp_ratio * c.embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
  """Decoder-only language model: tokens [batch, seq] -> logits [batch, seq, vocab]."""

  def __init__(self, config: GPTConfig, *, dtype=None, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.embed_dim, dtype=dtype,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_layers)])
    self.ln_f = nnx.LayerNorm(config.embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    x = self.ln_f(x)
    return self.embed.attend(x).astype(jnp.float32)  # tied output embedding


# ----------------------------------------------------------------------------
# Character-level tokenizer.
# ----------------------------------------------------------------------------

class CharTokenizer:
  """Maps each distinct character of a text to an id (sorted by code point)."""

  def __init__(self, chars):
    self.chars = list(chars)
    self._index = {c: i for i, c in enumerate(self.chars)}
    if len(self._index) != len(self.chars):
      raise ValueError("CharTokenizer chars must be distinct")

  @classmethod
  def from_text(cls, text: str) -> "CharTokenizer":
    if not text:
      raise ValueError("cannot build a tokenizer from empty text")
    return cls(sorted(set(text)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._index[c] for c in text), np.int32, len(text))
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

  def to_json(self) -> str:
    return json.dumps(self.chars)

  @classmethod
  def from_json(cls, text: str) -> "CharTokenizer":
    return cls(json.loads(text))


def param_count(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def generate(model: GPT, prompt, num_tokens: int, *, key: jax.Array,
             temperature: float = 1.0, context: int = 256) -> np.ndarray:
  """Samples num_tokens after prompt [seq] with a sliding window of `context` tokens.

  The window is right-padded to a fixed length (the model is causal, so padding
  after the last token changes nothing), so it compiles once. A demo, not fast:
  it recomputes the whole window for every token.
  """
  tokens = np.asarray(prompt, np.int32).reshape(-1).tolist()
  if not tokens:
    raise ValueError("prompt must hold at least one token")
  graphdef, state = nnx.split(model)

  @jax.jit
  def next_token(state, window, pos, key):
    logits = nnx.merge(graphdef, state)(window[None])[0, pos]
    return jax.random.categorical(key, logits / temperature)

  for _ in range(num_tokens):
    window = tokens[-context:]
    buf = np.zeros((context,), np.int32)
    buf[:len(window)] = window
    key, sub = jax.random.split(key)
    tokens.append(int(next_token(state, jnp.asarray(buf), len(window) - 1, sub)))
  return np.asarray(tokens[len(tokens) - num_tokens:], np.int32)


__all__ = ["GPTConfig", "GPT", "Block", "MLP", "CharTokenizer", "param_count", "generate"]
