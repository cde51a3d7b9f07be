"""Chunked prefill and constant-memory decoding (DESIGN §1.5).

Causal PolySketch attention is a walk over blocks whose only memory of the
past is the prefix state of the complete blocks, (S, z), plus, with exact local
weights, the tokens of the current incomplete block. `DecodeState` holds
exactly that, per sequence and kv head, in a size that does not depend on the
context length. `prefill` continues it by any number of tokens (on either
backend, through the same kernels as `polysketch_attention`); `decode_step`
continues it by one token in plain JAX (O(b H + r^2 H) per token and head).
Running a sequence in pieces of any lengths equals one call on the whole.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_polysketch import _validation
from pallas_polysketch.attention import (
    dispatch, pad_seq, resolve_config, round_up, upcast_float16)
from pallas_polysketch._xla import einsum
from pallas_polysketch.polynomial import divide_by_denominator


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["prefix_state", "normalizer", "tail_k", "tail_v", "tail_k_features",
                 "fill"],
    meta_fields=["degree", "block_size", "local_exact", "normalization_bias"])
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """The state of causal PolySketch attention after a prefix (a pytree).

  Attributes:
    prefix_state: S = sum over the complete blocks of Phi_k^T V,
      [batch, num_kv_heads, sketch_dim^2, head_dim] float32.
    normalizer: z = sum over the complete blocks of Phi_k^T 1,
      [batch, num_kv_heads, sketch_dim^2] float32.
    tail_k, tail_v: keys and values of the incomplete block,
      [batch, block_size, num_kv_heads, head_dim]; slots from `fill` on are 0.
    tail_k_features: their key features, [batch, block_size, num_kv_heads, sketch_dim].
    fill: tokens in the incomplete block, int32 [batch], in [0, block_size).
    degree, block_size, local_exact, normalization_bias: static, as in
      `polysketch_attention`.
  """
  prefix_state: jax.Array
  normalizer: jax.Array
  tail_k: jax.Array
  tail_v: jax.Array
  tail_k_features: jax.Array
  fill: jax.Array
  degree: int = 4
  block_size: int = 256
  local_exact: bool = True
  normalization_bias: float = 1.0

  @property
  def batch(self) -> int:
    """batch, from the stored tail's shape."""
    return self.tail_k.shape[0]

  @property
  def num_kv_heads(self) -> int:
    """num_kv_heads, from the stored tail's shape."""
    return self.tail_k.shape[2]

  @property
  def head_dim(self) -> int:
    """head_dim, from the stored tail's shape."""
    return self.tail_k.shape[3]

  @property
  def sketch_dim(self) -> int:
    """sketch_dim, from the stored tail's shape."""
    return self.tail_k_features.shape[3]

  def nbytes(self) -> int:
    """Bytes of the state: constant in the context length."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def init_decode_state(batch, num_kv_heads, head_dim, sketch_dim, *, degree=4,
                      block_size=256, local_exact=True, dtype=jnp.float32,
                      normalization_bias=1.0) -> DecodeState:
  """The state of an empty prefix: zeros, fill 0.

  dtype is that of the stored keys, values and key features of the incomplete
  block, a floating dtype; None means float32, the default (the prefix state
  is always float32)."""
  for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim), ("sketch_dim", sketch_dim)):
    _validation.check_positive_int(name, value)
  degree = _validation.check_degree(degree)
  block_size = _validation.check_block_size(block_size)
  bias = _validation.check_normalization_bias(normalization_bias)
  local_exact = _validation.check_bool("local_exact", local_exact)
  _validation.check_float_dtype_arg("dtype", dtype)
  if dtype is None:          # jnp.zeros' None: float64 with jax_enable_x64
    dtype = jnp.float32
  r2 = sketch_dim * sketch_dim
  tail = lambda d: jnp.zeros((batch, block_size, num_kv_heads, d), dtype)
  return DecodeState(
      prefix_state=jnp.zeros((batch, num_kv_heads, r2, head_dim), jnp.float32),
      normalizer=jnp.zeros((batch, num_kv_heads, r2), jnp.float32),
      tail_k=tail(head_dim), tail_v=tail(head_dim), tail_k_features=tail(sketch_dim),
      fill=jnp.zeros((batch,), jnp.int32), degree=degree, block_size=block_size,
      local_exact=local_exact, normalization_bias=bias)


def _check_state(state):
  """The fields of a DecodeState agree with each other (a state put together by
  hand or loaded from elsewhere): a tail of another batch or head count would
  otherwise broadcast into a wrong result."""
  _validation.check_degree(state.degree, name="state.degree")
  _validation.check_block_size(state.block_size, name="state.block_size")
  _validation.check_bool("state.local_exact", state.local_exact)
  _validation.check_normalization_bias(state.normalization_bias,
                                       name="state.normalization_bias")
  for name in ("tail_k", "tail_k_features"):
    _validation.check_rank(f"state.{name}", getattr(state, name), 4,
                           "[batch, block_size, num_kv_heads, dim]")
  batch, kv, h, r = state.batch, state.num_kv_heads, state.head_dim, state.sketch_dim
  want = {
      "prefix_state": ((batch, kv, r * r, h), "[batch, num_kv_heads, sketch_dim^2, head_dim]"),
      "normalizer": ((batch, kv, r * r), "[batch, num_kv_heads, sketch_dim^2]"),
      "tail_k": ((batch, state.block_size, kv, h),
                 "[batch, block_size, num_kv_heads, head_dim]"),
      "tail_v": ((batch, state.block_size, kv, h),
                 "[batch, block_size, num_kv_heads, head_dim]"),
      "tail_k_features": ((batch, state.block_size, kv, r),
                          "[batch, block_size, num_kv_heads, sketch_dim]"),
      "fill": ((batch,), "[batch]"),
  }
  for name, (shape, layout) in want.items():
    got = tuple(getattr(getattr(state, name), "shape", ()))
    if got != shape:
      raise ValueError(
          f"state.{name} must be {layout} = {shape} (from state.tail_k {state.tail_k.shape}, "
          f"state.tail_k_features {state.tail_k_features.shape} and "
          f"block_size={state.block_size}), got shape {got}")
  for name in ("prefix_state", "normalizer"):
    if getattr(state, name).dtype != jnp.float32:
      raise TypeError(f"state.{name} must be float32, got {getattr(state, name).dtype}")
  for name in ("tail_k", "tail_v", "tail_k_features"):
    if not jnp.issubdtype(getattr(state, name).dtype, jnp.floating):
      raise TypeError(f"state.{name} must have a floating dtype, got "
                      f"{getattr(state, name).dtype}: it would truncate the stored tokens")
  if not jnp.issubdtype(state.fill.dtype, jnp.integer):
    raise TypeError(f"state.fill must have an integer dtype (int32), got {state.fill.dtype}")
  try:
    fill = np.asarray(state.fill)
  except jax.errors.TracerArrayConversionError:
    fill = None                                    # traced (under jit): not checked
  if fill is not None and fill.size:
    if fill.min() < 0 or fill.max() >= state.block_size:
      raise ValueError(f"state.fill must lie in [0, block_size={state.block_size}) (the tokens of "
                       f"the incomplete block), got {fill.tolist()}")


def _check_state_matches(state, q, k, q_features, what):
  """Checks the state against itself and the inputs; returns it with fill as
  int32 (a narrower integer wrapped around in the index arithmetic: silently
  wrong outputs from an int8 or uint8 fill)."""
  if not isinstance(state, DecodeState):
    raise TypeError(f"state must be a DecodeState, got {type(state).__name__}")
  _check_state(state)
  b, _, n, h = q.shape
  kv, r = k.shape[2], q_features.shape[3]
  for name, got, want in (("batch", b, state.batch), ("num_kv_heads", kv, state.num_kv_heads),
                          ("head_dim", h, state.head_dim),
                          ("sketch_dim", r, state.sketch_dim)):
    if got != want:
      raise ValueError(
          f"{what} has {name}={got} but the state was made for {name}={want} "
          f"(q {q.shape}, k {k.shape}, q_features {q_features.shape})")
  return dataclasses.replace(state, fill=jnp.asarray(state.fill).astype(jnp.int32))


def _check_axes(q, allow_empty_seq):
  """Every axis of q but (for prefill) seq is >= 1: no heads or an empty head_dim
  failed deep in the xla path (a ZeroDivisionError) or ran silently."""
  empty = [d for i, d in enumerate(q.shape) if d == 0 and not (allow_empty_seq and i == 1)]
  if empty:
    allowed = "every axis but seq" if allow_empty_seq else "every axis"
    raise ValueError(f"q has an empty axis: shape {tuple(q.shape)} ([batch, seq, num_heads, "
                     f"head_dim]); {allowed} must be >= 1")


def _check_static_matches(state, **given):
  for name, value in given.items():
    if getattr(state, name) != value:
      raise ValueError(
          f"{name}={value!r} disagrees with the state, which was made for "
          f"{name}={getattr(state, name)!r}")


def _shift_rows(x, start, size):
  """Per row b: x[b, start[b] : start[b] + size] along the sequence axis."""
  return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, size, axis=0))(x, start)


def prefill(q, k, v, q_features, k_features, *, degree=4, block_size=256, local_exact=True,
            state=None, implementation=None, normalization_bias=1.0, interpret=False,
            tile_config=None):
  """Causal PolySketch attention over a chunk, continuing `state`.

  Prefilling in chunks of any lengths equals one prefill of the whole, which
  equals `polysketch_attention` on the whole sequence (causal). Differentiable
  on both backends, through the output and the returned state, with respect to
  the inputs and the given state (only its part symmetric in the feature pair
  (a, c) of the r^2 axis: every state the op makes is symmetric there).

  Args:
    q [batch, seq, num_heads, head_dim], k, v [batch, seq, num_kv_heads,
      head_dim], q_features [batch, seq, num_heads, sketch_dim], k_features
      [batch, seq, num_kv_heads, sketch_dim]: as for `polysketch_attention`.
    degree, block_size, local_exact, normalization_bias: as there; with
      `state` they must equal the state's.
    state: a `DecodeState` to continue, or None (an empty prefix).
    implementation, interpret, tile_config: as for `polysketch_attention`,
      but the kernels need a block_size that is a multiple of 128 here (no
      block covers a chunk that follows the state's incomplete block).

  Returns:
    (out [batch, seq, num_heads, head_dim] in q's dtype, the new DecodeState).
  """
  _validation.check_attention_inputs(q, k, v, q_features, k_features)
  _check_axes(q, allow_empty_seq=True)
  _validation.check_unchecked_shard_map(
      "prefill", dict(q=q, k=k, v=v, q_features=q_features, k_features=k_features,
                      state=state))
  if state is None:
    state = init_decode_state(q.shape[0], k.shape[2], q.shape[3], q_features.shape[3],
                              degree=degree, block_size=block_size, local_exact=local_exact,
                              dtype=k.dtype, normalization_bias=normalization_bias)
  state = _check_state_matches(state, q, k, q_features, "prefill's input")
  _check_static_matches(state, degree=degree, block_size=block_size,
                        local_exact=_validation.check_bool("local_exact", local_exact),
                        normalization_bias=_validation.check_normalization_bias(
                            normalization_bias))
  b = state.block_size
  # The chunk is laid after the incomplete block's fill tokens, so blocks stay
  # aligned to the sequence start: at most one extra block of work.
  aligned_len = round_up(q.shape[1] + b, b)
  config, implementation = resolve_config(
      q, k, q_features, degree=state.degree, block_size=b, local_exact=state.local_exact,
      normalization_bias=state.normalization_bias, implementation=implementation,
      interpret=interpret, tile_config=tile_config, padded_len=aligned_len,
      block_may_cover=False)
  out, state = _prefill(*upcast_float16(q, k, v, q_features, k_features), state, config=config,
                        implementation=implementation)
  return out.astype(q.dtype), state


@functools.partial(jax.jit, static_argnames=("config", "implementation"))
def _prefill(q, k, v, q_features, k_features, state, *, config, implementation):
  b = config.block_size
  seq = q.shape[1]
  aligned_len = round_up(seq + b, b)
  fill = state.fill
  pos = jnp.arange(aligned_len)[None, :, None, None]

  def aligned(x, tail=None):
    # [fill tokens of the tail | chunk | zeros], per row.
    ext = jnp.pad(x, ((0, 0), (b, aligned_len - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    shifted = _shift_rows(ext, b - fill, aligned_len)
    if tail is None:
      return shifted
    tail = pad_seq(tail.astype(x.dtype), aligned_len)
    return jnp.where(pos < fill[:, None, None, None], tail, shifted)

  ys = (aligned(q), aligned(k, state.tail_k), aligned(v, state.tail_v),
        aligned(q_features), aligned(k_features, state.tail_k_features))
  complete = (fill + seq) // b                       # blocks complete after the chunk

  def run(backend, *args):
    *inputs, s, z = args
    out, native = backend.causal(*inputs, backend.to_native(s, z), state_block=complete)
    return (out,) + tuple(backend.from_native(native, q.shape[3], q_features.shape[3]))

  out, s, z = dispatch(implementation, config, run, *ys, state.prefix_state, state.normalizer)
  out = _shift_rows(out, fill, seq)
  new_fill = (fill + seq) % b
  slot = jnp.arange(b)[None, :, None, None]

  def new_tail(y):
    y = _shift_rows(pad_seq(y, aligned_len + b), complete * b, b)
    return jnp.where(slot < new_fill[:, None, None, None], y, 0).astype(state.tail_k.dtype)

  return out, dataclasses.replace(
      state, prefix_state=s.astype(jnp.float32), normalizer=z.astype(jnp.float32),
      tail_k=new_tail(ys[1]), tail_v=new_tail(ys[2]), tail_k_features=new_tail(ys[4]),
      fill=new_fill.astype(jnp.int32))


def decode_step(state, q, k, v, q_features, k_features):
  """One new token per sequence: (out [batch, 1, num_heads, head_dim], new state).

  q [batch, 1, num_heads, head_dim], k, v [batch, 1, num_kv_heads, head_dim],
  q_features [batch, 1, num_heads, sketch_dim], k_features [batch, 1,
  num_kv_heads, sketch_dim]. Pure JAX, float32 at full precision; the state's
  size never depends on the context length, so `jax.jit(decode_step)` compiles
  once. The new token sees the fill tokens of its block and itself through
  exact weights (local_exact) and the complete blocks through the sketch; when
  it completes its block, the block is folded into (S, z) and the tail emptied.
  """
  _validation.check_attention_inputs(q, k, v, q_features, k_features)
  _check_axes(q, allow_empty_seq=False)
  if q.shape[1] != 1:
    raise ValueError(f"decode_step takes one token per sequence (seq=1), got q {q.shape}; "
                     "use prefill for longer chunks")
  state = _check_state_matches(state, q, k, q_features, "decode_step's token")
  return _decode_step(state, q, k, v, q_features, k_features)


@jax.jit
def _decode_step(state, q, k, v, q_features, k_features):
  f32 = jnp.float32
  b, kv = state.block_size, state.num_kv_heads
  batch, _, n, h = q.shape
  r = q_features.shape[3]
  group = n // kv
  fill = state.fill
  put = lambda tail, x: jax.vmap(
      lambda t, xi, i: jax.lax.dynamic_update_slice_in_dim(t, xi, i, axis=0))(
          tail, x.astype(tail.dtype), fill)
  tail_k, tail_v = put(state.tail_k, k), put(state.tail_v, v)
  tail_fk = put(state.tail_k_features, k_features)

  qg = q[:, 0].astype(f32).reshape(batch, kv, group, h)
  fqg = q_features[:, 0].astype(f32).reshape(batch, kv, group, r)
  seen = (jnp.arange(b)[None, :] <= fill[:, None])[:, None, None, :]   # [B, 1, 1, b]
  if state.local_exact:
    s = einsum("bkgh,bjkh->bkgj", qg, tail_k.astype(f32)) ** state.degree
  else:
    s = einsum("bkgr,bjkr->bkgj", fqg, tail_fk.astype(f32)) ** 2
  w = jnp.where(seen, s, 0.0)
  phi_q = (fqg[..., :, None] * fqg[..., None, :]).reshape(batch, kv, group, r * r)
  num = (einsum("bkgj,bjkh->bkgh", w, tail_v.astype(f32))
         + einsum("bkgc,bkch->bkgh", phi_q, state.prefix_state))
  den = (state.normalization_bias + jnp.sum(w, axis=-1)
         + einsum("bkgc,bkc->bkg", phi_q, state.normalizer))
  out = divide_by_denominator(num, den[..., None]).reshape(batch, 1, n, h).astype(q.dtype)

  full = fill + 1 == b

  def fold(args):
    s_, z_, tk, tv, tf = args
    phi_k = tf.astype(f32)
    phi_k = (phi_k[..., :, None] * phi_k[..., None, :]).reshape(batch, b, kv, r * r)
    keep = full[:, None, None, None]
    s_ = s_ + jnp.where(keep, einsum("bjkc,bjkh->bkch", phi_k, tv.astype(f32)), 0.0)
    z_ = z_ + jnp.where(keep[..., 0], jnp.sum(phi_k, axis=1), 0.0)
    empty = lambda t: jnp.where(full[:, None, None, None], jnp.zeros_like(t), t)
    return s_, z_, empty(tk), empty(tv), empty(tf)

  args = (state.prefix_state, state.normalizer, tail_k, tail_v, tail_fk)
  s_new, z_new, tail_k, tail_v, tail_fk = jax.lax.cond(jnp.any(full), fold, lambda a: a, args)
  return out, dataclasses.replace(
      state, prefix_state=s_new, normalizer=z_new, tail_k=tail_k, tail_v=tail_v,
      tail_k_features=tail_fk, fill=jnp.where(full, 0, fill + 1).astype(jnp.int32))
