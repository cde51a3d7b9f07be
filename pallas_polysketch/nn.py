"""Flax layers: PolySketch / polynomial / softmax self-attention (DESIGN §1).

`PolySketchAttention` is a Flax NNX module; `PolySketchAttentionLinen` wraps
it for Linen code through `flax.nnx.bridge`.

Per layer, as in the paper (Kacham, Mirrokni & Zhong, ICML 2024):

  q, k, v = x Wq, x Wk, x Wv                       (k, v with num_kv_heads heads)
  q, k    = rope(q), rope(k)                        (if rope)
  q, k    = LN(q), LN(k)                            one LayerNorm shared by q, k,
                                                    eps 1e-5 (polynomial,
                                                    polysketch only)
  f_q, f_k = f(q), f(k)                             one sketch shared by q, k
  o       = polysketch_attention(q, k, v, f_q, f_k) (or the exact / softmax op)
  y       = o Wo

Softmax uses no LayerNorm and the usual 1/sqrt(head_dim) scaling. Grouped-query
attention never repeats k or v: the LayerNorm and the sketch run once per kv
head, and the op keeps one prefix state per kv head.

Padding: `key_mask` [batch, seq] (True for real tokens) zeroes the masked
keys, values and key features after the LayerNorm and the sketch (whose
outputs at a zero input are not zero), so padding adds nothing to any sum.

Packing: `segment_ids` [batch, seq] (a segment is a maximal run of equal ids)
keeps attention inside each segment and counts rotary positions from each
segment's start, so a row of packed documents gives every document the
output it would get alone.

Decoding follows `flax.nnx.MultiHeadAttention`: `init_cache(input_shape)`
allocates a `DecodeState` (constant size) in `nnx.Cache` variables, and
`layer(x, decode=True)` continues it by x's tokens (a chunked prefill, or one
decode step when x holds one token), with rotary positions counted on.
The random sketch is drawn once per layer from the module's `rngs` and stored
in a `SketchVariable`, not an `nnx.Param`: `nnx.Optimizer(..., wrt=nnx.Param)`
never updates it. The learned sketch's parameters are `nnx.Param`s.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen
from flax import nnx

from pallas_polysketch import _validation
from pallas_polysketch.attention import IMPLEMENTATIONS, polysketch_attention
from pallas_polysketch.sharding import sharded_polysketch_attention
from pallas_polysketch.decode import DecodeState, decode_step, init_decode_state, prefill
from pallas_polysketch._segments import segment_starts
from pallas_polysketch.polynomial import polynomial_attention, same_segment_mask
from pallas_polysketch.sketches import (
    LAYER_NORM_EPS,
    SKETCH_SCALINGS,
    SKETCH_TYPES,
    check_random_degree,
    check_sketch_type,
    learned_sketch_features,
    learned_sketch_init,
    random_sketch_features,
    random_sketch_init,
)

ATTENTIONS = ("polysketch", "polynomial", "softmax")
SKETCHES = ("learned", "random", "none")
ROPE_BASE = 10_000.0


class SketchVariable(nnx.Variable):
  """A fixed (non-trainable) random sketch matrix; optimizers on nnx.Param skip it."""


# Linen collection name for the bridge (`variables["sketch"]`).
nnx.register_variable_name("sketch", SketchVariable, overwrite=True)


def rotary_embedding(x: jax.Array, base: float = ROPE_BASE, offset=0,
                     positions: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding on [batch, seq, heads, head_dim] (half-split pairs).

  Dimension i of the first half is rotated with dimension i + head_dim/2 by the
  angle t * base^(-2i/head_dim) at position t = offset + index. offset: an int
  or int32 [batch] (decoding: the tokens already seen). positions: None, or
  int [batch, seq] (or [1, seq]), the positions themselves (offset is then ignored; packed
  segments: counted from each segment's start). Computed in float32.
  """
  _validation.check_rank("x", x, 4, "[batch, seq, heads, head_dim]")
  base = _validation.check_positive_finite("base", base)  # 0, < 0, NaN: NaN angles
  b, t, _, h = x.shape
  if h % 2:
    raise ValueError(f"rotary_embedding needs an even head_dim, got x of shape {x.shape}")
  if positions is not None:
    if jnp.ndim(positions) != 2 or jnp.shape(positions)[0] not in (1, b) or (
        jnp.shape(positions)[1] != t):
      raise ValueError(f"positions must be [batch, seq] = {(b, t)} (the first two axes of "
                       f"x), got shape {jnp.shape(positions)}")
  elif jnp.size(offset) not in (1, b):
    raise ValueError(f"offset must be an int or [batch] = ({b},) (x has shape {x.shape}), "
                     f"got shape {jnp.shape(offset)}")
  half = h // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / h)
  if positions is not None:
    pos = jnp.asarray(positions, jnp.float32)                             # [B, T]
  else:
    pos = jnp.arange(t, dtype=jnp.float32)[None, :] + jnp.reshape(
        jnp.asarray(offset, jnp.float32), (-1, 1))                        # [B|1, T]
  angles = pos[..., None] * inv_freq                                      # [B|1, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _variables_to_arrays(tree):
  return jax.tree.map(lambda v: v[...], tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


class PolySketchAttention(nnx.Module):
  """Multi-head self-attention with PolySketch, exact polynomial or softmax weights.

  Args:
    in_features: model width; input and output are [batch, seq, in_features].
    num_heads: number of query heads.
    attention: "polysketch" (linear time, DESIGN §1.3), "polynomial" (exact
      (q.k)^degree, O(T^2)) or "softmax".
    head_dim: per-head size; default in_features // num_heads.
    num_kv_heads: key/value heads (grouped-query attention); must divide
      num_heads; default num_heads. Nothing is repeated: the op reads one
      state per kv head.
    sketch: "learned" (paper §4, trainable, shared by q and k), "random"
      (Algorithm 1, drawn once from `rngs`, fixed) or "none" (zero features:
      no sketched prefix, the exact local blocks alone; a block-local
      attention baseline, needs local_exact and causal). Used by "polysketch" only.
    sketch_dim: r, the sketch feature size.
    sketch_hidden_dim: the learned sketch's hidden width (default 8 *
      sketch_dim, the paper's); narrower is cheaper and a different model,
      see `learned_sketch_init`. Used with sketch="learned" only.
    sketch_type: the random sketch's matrices, "gaussian" or "hadamard"
      (random signs and sampled Hadamard columns, as the paper's official
      code; head_dim, and from degree 8 on sketch_dim, must be powers of two).
      See `random_sketch_init`. Used with sketch="random" only.
    sketch_scaling: "unbiased" (1/sqrt(r) per level) or "official" (the
      official code's 1/r, to reproduce its checkpoints). See
      `random_sketch_features`. Used with sketch="random" only.
    degree: p, even; the random sketch needs a power of two.
    block_size: b of `polysketch_attention`.
    local_exact: exact (q.k)^p weights inside each diagonal block.
    causal: causal attention.
    rope: rotary position embedding on q and k (head_dim must be even).
    dtype: computation dtype (None: from inputs and params).
    param_dtype: dtype of the parameters.
    implementation: passed through to `polysketch_attention`.
    normalization_bias: the positive constant in the polynomial/PolySketch
      denominator (softmax ignores it).
    mesh, mesh_axes: a `jax.sharding.Mesh` and the names of its axes that shard
      (batch, heads, seq) (each may be None): the PolySketch op then runs
      through `sharded_polysketch_attention`, exchanging only prefix states
      across the sequence axis.
    rngs: `nnx.Rngs` for initialisation (and the random sketch).
  """

  def __init__(self, in_features: int, num_heads: int, *,
               attention: str = "polysketch", head_dim: int | None = None,
               num_kv_heads: int | None = None, sketch: str = "learned",
               sketch_dim: int = 32, sketch_type: str = "gaussian",
               sketch_scaling: str = "unbiased", sketch_hidden_dim: int | None = None,
               degree: int = 4, block_size: int = 256,
               local_exact: bool = True, causal: bool = True, rope: bool = True,
               dtype: Any = None, param_dtype: Any = jnp.float32,
               implementation: str | None = None, normalization_bias: float = 1.0, mesh=None,
               mesh_axes: tuple = (None, None, None), rngs: nnx.Rngs):
    _validation.check_positive_int("in_features", in_features)
    _validation.check_positive_int("num_heads", num_heads)
    if attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if sketch not in SKETCHES:
      raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    local_exact = _validation.check_bool("local_exact", local_exact)
    causal = _validation.check_bool("causal", causal)
    if attention == "polysketch" and sketch == "none" and not (local_exact and causal):
      # non-causal attention has no exact local blocks: every weight is sketched
      raise ValueError("sketch='none' (no sketched prefix) needs local_exact=True and "
                       f"causal=True, or every weight is zero; got local_exact={local_exact}, "
                       f"causal={causal}")
    if head_dim is None:
      if in_features % num_heads:
        raise ValueError(
            f"in_features ({in_features}) must be divisible by num_heads "
            f"({num_heads}) when head_dim is not given")
      head_dim = in_features // num_heads
    _validation.check_positive_int("head_dim", head_dim)
    if num_kv_heads is None:
      num_kv_heads = num_heads
    _validation.check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
      raise ValueError(
          f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    _validation.check_positive_int("sketch_dim", sketch_dim)
    if sketch_hidden_dim is not None:
      _validation.check_positive_int("sketch_hidden_dim", sketch_hidden_dim)
    _validation.check_degree(degree)
    _validation.check_choice("sketch_type", sketch_type, SKETCH_TYPES)
    _validation.check_choice("sketch_scaling", sketch_scaling, SKETCH_SCALINGS)
    if attention == "polysketch" and sketch == "random":
      check_random_degree(degree)
      check_sketch_type(sketch_type, head_dim, sketch_dim, degree)  # powers of two
    _validation.check_block_size(block_size)
    rope = _validation.check_bool("rope", rope)
    if rope and head_dim % 2:
      raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    if implementation not in IMPLEMENTATIONS:
      raise ValueError(
          f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _validation.check_float_dtype_arg("dtype", dtype)
    _validation.check_float_dtype_arg("param_dtype", param_dtype)

    self.in_features = in_features
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.attention = attention
    self.sketch_kind = sketch
    self.sketch_dim = sketch_dim
    self.sketch_type = sketch_type
    self.sketch_scaling = sketch_scaling
    self.sketch_hidden_dim = sketch_hidden_dim
    self.degree = degree
    self.block_size = block_size
    self.local_exact = local_exact
    self.causal = causal
    self.rope = rope
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.implementation = implementation
    self.normalization_bias = _validation.check_normalization_bias(normalization_bias)
    self.sharded_op = None
    if mesh is not None:
      if attention != "polysketch":
        raise ValueError(f"mesh needs attention='polysketch', got attention={attention!r}")
      if len(tuple(mesh_axes)) != 3:
        raise ValueError(f"mesh_axes must be (batch, heads, seq) axis names, got {mesh_axes!r}")
      batch_axis, head_axis, seq_axis = mesh_axes
      self.sharded_op = sharded_polysketch_attention(
          mesh, batch_axis=batch_axis, head_axis=head_axis, seq_axis=seq_axis,
          degree=degree, block_size=block_size, causal=causal, local_exact=local_exact,
          normalization_bias=normalization_bias, implementation=implementation)

    def linear(d_in, d_out):
      return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)

    self.query = linear(in_features, num_heads * head_dim)
    self.key = linear(in_features, num_kv_heads * head_dim)
    self.value = linear(in_features, num_kv_heads * head_dim)
    self.out = linear(num_heads * head_dim, in_features)
    if attention in ("polysketch", "polynomial"):
      self.qk_norm = nnx.LayerNorm(head_dim, epsilon=LAYER_NORM_EPS, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
    else:
      self.qk_norm = None
    if attention == "polysketch":
      key = rngs.params()
      if sketch == "learned":
        params = learned_sketch_init(key, head_dim, sketch_dim, hidden_dim=sketch_hidden_dim)
        self.sketch = nnx.data(jax.tree.map(
            lambda a: nnx.Param(a.astype(param_dtype)), params))
      elif sketch == "none":
        self.sketch = None
      else:
        params = random_sketch_init(key, head_dim, sketch_dim, degree,
                                    sketch_type=sketch_type)
        self.sketch = nnx.data(jax.tree.map(SketchVariable, params))
    else:
      self.sketch = None

  def features(self, x: jax.Array) -> jax.Array:
    """Sketch features f(x): [..., head_dim] -> [..., feature_dim] (polysketch only):
    sketch_dim, but head_dim for sketch="random" at degree 2 (the identity)."""
    if self.attention != "polysketch":
      raise ValueError(f"attention={self.attention!r} has no sketch features")
    x = x if hasattr(x, "dtype") else jnp.asarray(x)
    # an integer x cast the random sketch's matrices to integers (garbage features),
    # and sketch="none" took any last dim
    _validation.check_float_dtype("x", x)
    if jnp.ndim(x) == 0 or x.shape[-1] != self.head_dim:
      raise ValueError(f"x must be [..., head_dim] = [..., {self.head_dim}], got shape "
                       f"{jnp.shape(x)}")
    if self.sketch_kind == "none":
      return jnp.zeros(x.shape[:-1] + (self.sketch_dim,), x.dtype)
    params = _variables_to_arrays(self.sketch)
    if self.sketch_kind == "learned":
      # The Pallas feature kernels on TPU, unless the layer asks for pure JAX
      # or shards over a mesh: the kernels split only the batch over devices
      # (heads or the sequence sharded would gather q and k onto every device).
      pure_jax = self.implementation == "xla" or self.sharded_op is not None
      return learned_sketch_features(params, x, implementation="xla" if pure_jax else None)
    # float matrices and signs in the compute dtype; hadamard column indices stay int32
    params = jax.tree.map(
        lambda a: a.astype(x.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
    return random_sketch_features(params, x, scaling=self.sketch_scaling).astype(x.dtype)

  def _project(self, x, offset, positions=None):
    """q [B, T, N, H], k, v [B, T, K, H] after rope and the q/k LayerNorm."""
    b, t, _ = x.shape
    q = self.query(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.key(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.value(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.rope:
      q = rotary_embedding(q, offset=offset, positions=positions)
      k = rotary_embedding(k, offset=offset, positions=positions)
    if self.qk_norm is not None:
      q, k = self.qk_norm(q), self.qk_norm(k)
    return q, k, v

  def _check_x(self, x, key_mask, segment_ids=None, decode=False):
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(
          f"x must be [batch, seq, {self.in_features}], got shape {x.shape}")
    if key_mask is not None and tuple(key_mask.shape) != tuple(x.shape[:2]):
      raise ValueError(
          f"key_mask must be [batch, seq] = {tuple(x.shape[:2])}, got shape {key_mask.shape}")
    if key_mask is not None and not (jnp.issubdtype(key_mask.dtype, jnp.bool_)
                                     or jnp.issubdtype(key_mask.dtype, jnp.integer)):
      # a float mask was cast to bool: an additive one (0 keep, -inf drop) inverted
      raise TypeError(f"key_mask must be bool (True for real tokens) or integer 0/1, got "
                      f"dtype {key_mask.dtype}")
    segment_ids = _validation.check_segment_ids(segment_ids, x)
    if segment_ids is not None and decode:
      raise ValueError("segment_ids is not supported with decode=True (a cache holds one "
                       "sequence per row); pass segment_ids=None")
    if key_mask is not None and decode:
      raise ValueError("key_mask is not supported with decode=True (the cache keeps every "
                       "token it is given); pass key_mask=None")
    return segment_ids

  def __call__(self, x: jax.Array, *, key_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, decode: bool = False,
               exact_polynomial: bool = False) -> jax.Array:
    """[batch, seq, in_features] -> [batch, seq, in_features].

    key_mask: None or bool [batch, seq] (or integer 0/1; not float), False for
      padding keys (never seen). Not with decode.
    segment_ids: None or int32 [batch, seq]: packed sequences. A segment is a
      maximal run of equal ids; tokens attend only within their segment, and
      rotary positions count from each segment's start, so every segment gets
      the output of running it alone (all three attentions). Not with decode.
    decode: continue the cache from `init_cache` by x's tokens (causal
      "polysketch" only); positions continue from the tokens already cached.
    exact_polynomial: ("polysketch" only) compute the exact polynomial
      attention the sketch approximates, (q.k)^degree over every key with the
      same parameters and the sketch unused: O(seq^2). For a warm-up phase of
      training (`TrainConfig.polynomial_warmup_steps`) and for measuring the
      sketch's error on a trained layer.
    """
    decode = _validation.check_bool("decode", decode)
    key_mask = None if key_mask is None else jnp.asarray(key_mask)   # a list failed on .shape
    segment_ids = self._check_x(x, key_mask, segment_ids, decode)
    exact_polynomial = _validation.check_bool("exact_polynomial", exact_polynomial)
    if exact_polynomial and (self.attention != "polysketch" or decode):
      raise ValueError(
          "exact_polynomial=True needs attention='polysketch' and decode=False, got "
          f"attention={self.attention!r}, decode={decode}")
    if decode:
      return self._decode(x)
    b, t, _ = x.shape
    positions = None
    if segment_ids is not None:
      positions = jnp.arange(t, dtype=jnp.int32) - segment_starts(segment_ids)
    q, k, v = self._project(x, 0, positions)
    if self.attention == "softmax":
      mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
      is_causal = self.causal
      if segment_ids is not None:
        # One explicit mask: the segments, causality and the padding keys.
        mask = same_segment_mask(segment_ids) if mask is None else (
            mask & same_segment_mask(segment_ids))
        if self.causal:
          mask = mask & jnp.tril(jnp.ones((t, t), bool))
        is_causal = False
      o = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, mask=mask,
                                       scale=1.0 / math.sqrt(self.head_dim))
    else:
      keep = None if key_mask is None else key_mask[:, :, None, None].astype(bool)
      if keep is not None:
        k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
      if self.attention == "polynomial" or exact_polynomial:
        o = polynomial_attention(q, k, v, degree=self.degree, causal=self.causal,
                                 normalization_bias=self.normalization_bias,
                                 segment_ids=segment_ids)
      else:
        fq, fk = self.features(q), self.features(k)
        if keep is not None:
          fk = jnp.where(keep, fk, 0)
        if self.sharded_op is not None:
          o = self.sharded_op(q, k, v, fq, fk, segment_ids)
        else:
          o = polysketch_attention(
              q, k, v, fq, fk, degree=self.degree, block_size=self.block_size,
              causal=self.causal, local_exact=self.local_exact,
              normalization_bias=self.normalization_bias, segment_ids=segment_ids,
              implementation=self.implementation)
    return self.out(o.reshape(b, t, self.num_heads * self.head_dim))

  def init_cache(self, input_shape, dtype: Any = jnp.float32) -> None:
    """Allocates an empty decoding cache for inputs of shape [batch, ., in_features].

    The cache is a `DecodeState` (r^2 (H + 1) + b (2H + r) numbers per sequence and
    kv head, whatever the context) and the count of tokens seen, in
    `nnx.Cache` variables; dtype is that of the cached block of k, v (None:
    float32)."""
    if self.attention != "polysketch" or not self.causal:
      raise ValueError(
          "decoding with a cache needs attention='polysketch' and causal=True, got "
          f"attention={self.attention!r}, causal={self.causal}")
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or shape[-1] != self.in_features:
      raise ValueError(
          f"input_shape must be the shape of the inputs, [batch, seq, in_features="
          f"{self.in_features}] (e.g. x.shape), got {input_shape!r}")
    batch = shape[0]
    # the size of `features`: the degree-2 random sketch is the identity (head_dim)
    feature_dim = (self.head_dim if self.sketch_kind == "random" and self.degree == 2
                   else self.sketch_dim)
    state = init_decode_state(batch, self.num_kv_heads, self.head_dim, feature_dim,
                              degree=self.degree, block_size=self.block_size,
                              local_exact=self.local_exact, dtype=dtype,
                              normalization_bias=self.normalization_bias)
    self.cache = nnx.data({name: nnx.Cache(getattr(state, name)) for name in _STATE_FIELDS})
    self.cache_index = nnx.Cache(jnp.zeros((batch,), jnp.int32))

  def _decode(self, x):
    if getattr(self, "cache_index", None) is None:
      raise ValueError("call init_cache(input_shape) before decode=True")
    b, t, _ = x.shape
    if b != self.cache_index.shape[0]:
      raise ValueError(f"x has batch {b} (shape {x.shape}) but the cache was made for batch "
                       f"{self.cache_index.shape[0]} (init_cache)")
    fields = {name: var[...] for name, var in self.cache.items()}
    state = DecodeState(**fields, degree=self.degree, block_size=self.block_size,
                        local_exact=self.local_exact,
                        normalization_bias=self.normalization_bias)
    q, k, v = self._project(x, self.cache_index[...])
    fq, fk = self.features(q), self.features(k)
    if t == 1:
      o, state = decode_step(state, q, k, v, fq, fk)
    else:
      o, state = prefill(q, k, v, fq, fk, degree=self.degree, block_size=self.block_size,
                         local_exact=self.local_exact, state=state,
                         normalization_bias=self.normalization_bias,
                         implementation=self.implementation)
    for name, var in self.cache.items():
      var[...] = getattr(state, name)
    self.cache_index[...] = self.cache_index[...] + t
    return self.out(o.reshape(b, t, self.num_heads * self.head_dim))


_STATE_FIELDS = ("prefix_state", "normalizer", "tail_k", "tail_v", "tail_k_features", "fill")


class PolySketchAttentionLinen(linen.Module):
  """Linen version of `PolySketchAttention` (built with nnx.bridge).

  The fields are the NNX layer's arguments but `mesh` and `mesh_axes`; the
  call takes x, key_mask and segment_ids (no decoding cache, no
  exact_polynomial).

  Parameters live in the "params" collection, the fixed random sketch in the
  "sketch" collection, both under the submodule name "attention":

    layer = PolySketchAttentionLinen(in_features=128, num_heads=4)
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
  """
  in_features: int
  num_heads: int
  attention: str = "polysketch"
  head_dim: int | None = None
  num_kv_heads: int | None = None
  sketch: str = "learned"
  sketch_dim: int = 32
  degree: int = 4
  block_size: int = 256
  local_exact: bool = True
  causal: bool = True
  rope: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  implementation: str | None = None
  sketch_type: str = "gaussian"  # last, so positional construction keeps working
  sketch_scaling: str = "unbiased"
  normalization_bias: float = 1.0
  sketch_hidden_dim: int | None = None

  @linen.compact
  def __call__(self, x, key_mask=None, segment_ids=None):
    """[batch, seq, in_features] -> [batch, seq, in_features]; key_mask and
    segment_ids as for `PolySketchAttention.__call__`."""
    kwargs = dict(
        attention=self.attention, head_dim=self.head_dim,
        num_kv_heads=self.num_kv_heads, sketch=self.sketch,
        sketch_dim=self.sketch_dim, sketch_type=self.sketch_type,
        sketch_scaling=self.sketch_scaling, sketch_hidden_dim=self.sketch_hidden_dim,
        degree=self.degree,
        block_size=self.block_size, local_exact=self.local_exact,
        causal=self.causal, rope=self.rope, dtype=self.dtype,
        param_dtype=self.param_dtype, implementation=self.implementation,
        normalization_bias=self.normalization_bias)
    if not self.is_initializing():
      self._check_variables(kwargs)
    return nnx.bridge.to_linen(
        PolySketchAttention, self.in_features, self.num_heads, **kwargs,
        name="attention")(x, key_mask=key_mask, segment_ids=segment_ids)

  def _check_variables(self, kwargs):
    """The given variables must be those this config builds: nnx.bridge loads
    them without a check, so another config's failed inside JAX ("cannot
    reshape") or ran silently (a missing sketch kept its fresh random init;
    a sketch of another sketch_dim was used as given)."""
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
    abstract = nnx.eval_shape(lambda: PolySketchAttention(
        self.in_features, self.num_heads, **kwargs, rngs=nnx.Rngs(0)))
    want = {name(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(nnx.state(abstract)))[0]}
    given = {}
    for collection in self.variables.values():
      given.update({name(p): jnp.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(
          linen.unbox(collection.get("attention", {})))[0]})
    missing = sorted(set(want) - set(given))
    if missing:
      raise ValueError(f"PolySketchAttentionLinen: the variables lack {missing[:5]}, which "
                       f"this config builds (attention={self.attention!r}, sketch={self.sketch!r}); "
                       "were they made for another config?")
    for path, shape in want.items():
      if tuple(given[path]) != tuple(shape):
        raise ValueError(
            f"PolySketchAttentionLinen: attention/{path} has shape {tuple(given[path])} in the "
            f"variables, this config builds {tuple(shape)} (in_features={self.in_features}, "
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, sketch_dim={self.sketch_dim}, "
            f"sketch_hidden_dim={self.sketch_hidden_dim}); were they made for another config?")


__all__ = [
    "ATTENTIONS",
    "SKETCHES",
    "PolySketchAttention",
    "PolySketchAttentionLinen",
    "SketchVariable",
    "rotary_embedding",
]
