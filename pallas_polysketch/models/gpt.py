"""A small GPT-style decoder built on `PolySketchAttention`.

Pre-LayerNorm blocks (x + attn(LN(x)), x + mlp(LN(x))), a GELU MLP, a final
LayerNorm and tied input/output embeddings. Positions come from the rotary
embedding inside the attention layer (no absolute position table), so one
model runs at any context length.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_polysketch import _validation
from pallas_polysketch.nn import PolySketchAttention


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Model hyperparameters; `num_heads`, `num_kv_heads` and `attention` ...
  `sketch_hidden_dim` go to every `PolySketchAttention` layer (causal; its
  other arguments at their defaults)."""
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
  sketch_hidden_dim: int | None = None   # the learned sketch's hidden width; None: 8 * sketch_dim

  def __post_init__(self):
    # The layer checks the attention's options; these sizes are the model's own
    # (num_layers=-1 built a model without layers).
    for name in ("vocab_size", "num_layers", "num_heads", "embed_dim", "mlp_ratio"):
      _validation.check_positive_int(name, getattr(self, name))
    if self.embed_dim % self.num_heads:   # the layer's error named its own fields
      raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads "
                       f"({self.num_heads}): each head gets embed_dim / num_heads features")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "GPTConfig":
    return cls(**json.loads(text))


class MLP(nnx.Module):
  """Linear(dim -> hidden) -> GELU -> Linear(hidden -> dim), with biases:
  [..., dim] -> [..., dim]."""

  def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
    self.up = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm decoder block."""

  def __init__(self, config: GPTConfig, *, dtype=None, mesh=None,
               mesh_axes=(None, None, None), rngs: nnx.Rngs):
    c = config
    self.ln1 = nnx.LayerNorm(c.embed_dim, dtype=dtype, rngs=rngs)
    self.attn = PolySketchAttention(
        c.embed_dim, c.num_heads, attention=c.attention,
        num_kv_heads=c.num_kv_heads, sketch=c.sketch, sketch_dim=c.sketch_dim,
        sketch_hidden_dim=c.sketch_hidden_dim, degree=c.degree, block_size=c.block_size,
        local_exact=c.local_exact,
        causal=True, rope=c.rope, dtype=dtype, implementation=c.implementation,
        mesh=mesh, mesh_axes=mesh_axes, rngs=rngs)
    self.ln2 = nnx.LayerNorm(c.embed_dim, dtype=dtype, rngs=rngs)
    self.mlp = MLP(c.embed_dim, c.mlp_ratio * c.embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, key_mask=None, segment_ids=None, decode=False,
               exact_polynomial=False):
    """x [batch, seq, embed_dim]; the keyword arguments: see `GPT.__call__`."""
    x = x + self.attn(self.ln1(x), key_mask=key_mask, segment_ids=segment_ids,
                      decode=decode, exact_polynomial=exact_polynomial)
    return x + self.mlp(self.ln2(x))


class GPT(nnx.Module):
  """Decoder-only language model: tokens [batch, seq] -> logits [batch, seq, vocab].

  config: a `GPTConfig`. dtype: the computation dtype (None: from inputs and
  params; parameters are float32). rngs: `nnx.Rngs` for initialisation.
  mesh, mesh_axes: optional; every attention layer then runs sharded over the
  mesh's (batch, heads, seq) axes (see `PolySketchAttention`).
  """

  def __init__(self, config: GPTConfig, *, dtype=None, mesh=None,
               mesh_axes=(None, None, None), rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Embed(config.vocab_size, config.embed_dim, dtype=dtype,
                           embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, mesh=mesh, mesh_axes=mesh_axes,
                                  rngs=rngs)
                            for _ in range(config.num_layers)])
    self.ln_f = nnx.LayerNorm(config.embed_dim, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, key_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False,
               exact_polynomial: bool = False) -> jax.Array:
    """tokens [batch, seq] int -> logits [batch, seq, vocab] float32.

    key_mask: None or bool [batch, seq], False for padding tokens.
    segment_ids: None or int32 [batch, seq]: packed documents, one segment per
      maximal run of equal ids; each document's logits are those it would get
      alone (attention stays inside it, rotary positions restart at its start).
    decode: continue every layer's cache (`init_cache`) by these tokens.
    exact_polynomial: (attention "polysketch") every layer computes the exact
      polynomial attention its sketch approximates, with the same parameters
      (`PolySketchAttention`; the warm-up of `TrainConfig.polynomial_warmup_steps`).
    """
    # 1-D tokens failed in the first layer, naming its x [batch, seq, embed_dim]
    if jnp.ndim(tokens) != 2:
      raise ValueError(f"tokens must be [batch, seq] token ids, got shape {jnp.shape(tokens)}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
      raise TypeError(f"tokens must be integer token ids, got dtype {jnp.result_type(tokens)}")
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x, key_mask=key_mask, segment_ids=segment_ids, decode=decode,
                exact_polynomial=exact_polynomial)
    x = self.ln_f(x)
    return self.embed.attend(x).astype(jnp.float32)  # tied output embedding

  def init_cache(self, batch: int, dtype=jnp.float32) -> None:
    """Empty decoding caches in every layer for `batch` sequences (constant size
    in the context); dtype: that of the cached incomplete block of k and v."""
    for block in self.blocks:
      block.attn.init_cache((batch, 1, self.config.embed_dim), dtype)


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
    """The tokenizer of text's distinct characters; raises on empty text."""
    if not text:
      raise ValueError("cannot build a tokenizer from empty text")
    return cls(sorted(set(text)))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """int32 [len(text)] ids; raises on a character outside the vocabulary."""
    try:
      return np.fromiter((self._index[c] for c in text), np.int32, len(text))
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None

  def decode(self, ids) -> str:
    """The text of ids (any shape, flattened); raises on an id outside
    [0, vocab_size)."""
    ids = np.asarray(ids).reshape(-1)
    bad = ids[(ids < 0) | (ids >= len(self.chars))]   # -1 decoded as the last character
    if bad.size:
      raise ValueError(f"id {bad[0]} is outside the vocabulary [0, {len(self.chars)})")
    return "".join(self.chars[int(i)] for i in ids)

  def to_json(self) -> str:
    return json.dumps(self.chars)

  @classmethod
  def from_json(cls, text: str) -> "CharTokenizer":
    return cls(json.loads(text))


def param_count(model: nnx.Module) -> int:
  """Number of trainable parameters (`nnx.Param` entries; the fixed random
  sketches and caches are not counted)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def generate(model: GPT, prompt, num_tokens: int, *, key: jax.Array | None = None,
             temperature: float = 1.0, use_cache: bool | None = None,
             context: int = 256) -> np.ndarray:
  """Generates num_tokens tokens after prompt ([seq] or [batch, seq] ints).

  temperature 0 is greedy (argmax); above 0 samples from softmax(logits / T)
  and needs `key`. With the cache (the default for PolySketch models) the
  prompt is prefilled once and each new token is one `decode_step` per layer:
  constant time and memory per token, one compilation. Without it (softmax or
  polynomial models, or use_cache=False) every token recomputes a window of the
  last `context` tokens, right-padded to a fixed length so it compiles once.

  Returns:
    [num_tokens] (or [batch, num_tokens]) int32.
  """
  _validation.check_positive_int("num_tokens", num_tokens)
  _validation.check_positive_int("context", context)
  prompt = np.asarray(prompt)
  squeeze = prompt.ndim == 1
  prompt = prompt.reshape(1, -1) if squeeze else prompt
  if prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be [seq] or [batch, seq] with batch, seq >= 1, got "
                     f"shape {prompt.shape}")
  if not np.issubdtype(prompt.dtype, np.integer):
    raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
  vocab = model.config.vocab_size
  if prompt.min() < 0 or prompt.max() >= vocab:
    bad = prompt[(prompt < 0) | (prompt >= vocab)][0]
    raise ValueError(f"prompt holds token id {bad}, outside the vocabulary [0, {vocab})")
  prompt = prompt.astype(np.int32)
  # a real number (a 0-d array too): a jnp scalar failed inside jit, NaN sampled token 0
  as_array = np.asarray(temperature)
  if as_array.ndim != 0 or as_array.dtype.kind not in "iuf":   # not bool, str, None
    raise TypeError(f"temperature must be a number >= 0, got {temperature!r}")
  temperature = float(temperature)
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
  if temperature > 0 and key is None:
    raise ValueError("sampling with temperature > 0 needs key")
  if key is not None:
    _validation.check_prng_key("key", key)
  key = jax.random.key(0) if key is None else key
  cfg = model.config
  if use_cache is None:
    use_cache = cfg.attention == "polysketch"
  use_cache = _validation.check_bool("use_cache", use_cache)  # "no" turned the cache on
  graphdef, state = nnx.split(model)

  def pick(logits, key):
    if temperature == 0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

  batch = prompt.shape[0]
  out = []
  if use_cache:
    cached = nnx.clone(model)      # the caches go on a copy: the caller's model keeps none
    cached.init_cache(batch)
    graphdef, state = nnx.split(cached)

    @jax.jit
    def step(state, tokens, key):
      m = nnx.merge(graphdef, state)
      logits = m(tokens, decode=True)[:, -1]
      return pick(logits, key), nnx.state(m)

    key, sub = jax.random.split(key)
    token, state = step(state, jnp.asarray(prompt), sub)
    out.append(token)
    for _ in range(num_tokens - 1):
      key, sub = jax.random.split(key)
      token, state = step(state, token[:, None], sub)
      out.append(token)
  else:
    tokens = prompt

    @jax.jit
    def next_token(state, window, pos, key):
      logits = nnx.merge(graphdef, state)(window)[:, pos]
      return pick(logits, key)

    for _ in range(num_tokens):
      window = tokens[:, -context:]
      buf = np.zeros((batch, context), np.int32)
      buf[:, :window.shape[1]] = window
      key, sub = jax.random.split(key)
      token = np.asarray(next_token(state, jnp.asarray(buf), window.shape[1] - 1, sub))
      tokens = np.concatenate([tokens, token[:, None]], axis=1)
      out.append(token)
  result = np.stack([np.asarray(t) for t in out[:num_tokens]], axis=1).astype(np.int32)
  return result[0] if squeeze else result


__all__ = ["GPTConfig", "GPT", "Block", "MLP", "CharTokenizer", "param_count", "generate"]
