"""PolySketch attention (DESIGN §1.3): the public op and its dispatch."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_polysketch import _validation
from pallas_polysketch import tpu_config
from pallas_polysketch._pallas_backward import polysketch_backward
from pallas_polysketch._pallas_forward import polysketch_forward
from pallas_polysketch._platform import require_tpu
from pallas_polysketch._xla import polysketch_xla

IMPLEMENTATIONS = (None, "xla", "pallas")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _pad_seq(x, seq_len):
  pad = seq_len - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _pallas_attention(q, k, v, q_features, k_features, degree, block_size, causal,
                      local_exact, tiles, interpret):
  """The fused kernels with their custom VJP; T a multiple of block_size."""
  o, _ = polysketch_forward(q, k, v, q_features, k_features, degree=degree,
                            block_size=block_size, causal=causal,
                            local_exact=local_exact, tiles=tiles, interpret=interpret)
  return o


def _pallas_attention_fwd(q, k, v, q_features, k_features, degree, block_size,
                          causal, local_exact, tiles, interpret):
  o, den = polysketch_forward(q, k, v, q_features, k_features, degree=degree,
                              block_size=block_size, causal=causal,
                              local_exact=local_exact, tiles=tiles, interpret=interpret)
  # Residuals: inputs, output and the [B, N, 1, T] denominator; never states.
  return o, (q, k, v, q_features, k_features, o, den)


def _pallas_attention_bwd(degree, block_size, causal, local_exact, tiles,
                          interpret, residuals, do):
  q, k, v, q_features, k_features, o, den = residuals
  return polysketch_backward(q, k, v, q_features, k_features, o, den, do,
                             degree=degree, block_size=block_size, causal=causal,
                             local_exact=local_exact, tiles=tiles, interpret=interpret)


_pallas_attention.defvjp(_pallas_attention_fwd, _pallas_attention_bwd)


@functools.partial(
    jax.jit,
    static_argnames=("degree", "block_size", "causal", "local_exact",
                     "implementation", "interpret", "tiles"))
def _polysketch_attention(q, k, v, q_features, k_features, *, degree, block_size,
                          causal, local_exact, implementation, interpret, tiles):
  seq_len = q.shape[1]
  padded_len = _round_up(seq_len, block_size)
  # Zero padding is exact: a zero key has zero exact weight (degree > 0) and
  # zero features, so padded keys add nothing; padded queries are sliced off.
  q, k, v, q_features, k_features = (
      _pad_seq(x, padded_len) for x in (q, k, v, q_features, k_features))
  kwargs = dict(degree=degree, block_size=block_size, causal=causal,
                local_exact=local_exact)

  def xla_path(q, k, v, q_features, k_features):
    return polysketch_xla(q, k, v, q_features, k_features, **kwargs)

  def pallas_path(q, k, v, q_features, k_features):
    if not interpret:
      q = require_tpu(q)
    return _pallas_attention(q, k, v, q_features, k_features, degree, block_size,
                             causal, local_exact, tiles, interpret)

  args = (q, k, v, q_features, k_features)
  if implementation == "xla":
    out = xla_path(*args)
  elif implementation == "pallas":
    out = pallas_path(*args)
  else:  # None: decided by the platform lowered for, not the default backend.
    out = jax.lax.platform_dependent(*args, tpu=pallas_path, default=xla_path)
  return out[:, :seq_len]


def polysketch_attention(q, k, v, q_features, k_features, *, degree=4,
                         block_size=256, causal=True, local_exact=True,
                         implementation=None, interpret=False, tile_config=None):
  """Block-causal PolySketch attention, linear in the sequence length.

  For query i and key j <= i (DESIGN §1.3):

    w_ij = (q_i . k_j)^degree       if block(j) == block(i) and local_exact
    w_ij = (f_q,i . f_k,j)^2        otherwise
    o_i  = sum_j w_ij v_j / (1 + sum_j w_ij)

  Non-causal attention uses w_ij = (f_q,i . f_k,j)^2 for all j (local_exact
  has no effect there). The sketched weights come from prefix states of size
  sketch_dim^2 x head_dim carried over blocks, so cost and memory grow linearly
  in seq. The op does not normalise q and k: apply a LayerNorm first (the Flax
  layer does), or (q . k)^degree overflows.

  Args:
    q, k, v: [batch, seq, heads, head_dim], one floating dtype.
    q_features, k_features: [batch, seq, heads, sketch_dim], sketch features
      f(q), f(k) (e.g. from `random_sketch_features` or
      `learned_sketch_features`); one floating dtype.
    degree: p, a positive even int, of the exact local weights.
    block_size: b, a positive multiple of 8. seq need not be a multiple of it
      (inputs are zero-padded internally); a block longer than seq is clamped.
    causal: causal (block-causal) attention or full attention.
    local_exact: exact (q.k)^p weights inside each diagonal block.
    implementation: None (the fastest available for the platform), "xla"
      (blocked pure JAX) or "pallas" (the fused TPU kernel).
    interpret: for "pallas": run the kernel in interpret mode on any backend;
      True or a `pltpu.InterpretParams`. Without it, "pallas" needs a TPU (or
      a lowering for TPU, e.g. `jax.export` from a CPU host).
    tile_config: a `TileConfig` (kernel tiling and target generation); None
      uses the defaults of the local TPU generation.

  Returns:
    [batch, seq, heads, head_dim] in the dtype of q. Accumulation is float32.
  """
  _validation.check_qkv(q, k, v)
  _validation.check_features(q, q_features, k_features)
  degree = _validation.check_degree(degree)
  block_size = _validation.check_block_size(block_size)
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if tile_config is not None and not isinstance(tile_config, tpu_config.TileConfig):
    raise TypeError(f"tile_config must be a TileConfig, got {type(tile_config).__name__}")
  block_size = min(block_size, _round_up(q.shape[1], 8))
  tiles = None
  if implementation != "xla":
    tiles = tpu_config.resolve_tiles(
        tile_config, block_size=block_size, head_dim=q.shape[-1],
        sketch_dim=q_features.shape[-1], dtype=q.dtype, feature_dtype=q_features.dtype)
  return _polysketch_attention(
      q, k, v, q_features, k_features, degree=degree, block_size=block_size,
      causal=bool(causal), local_exact=bool(local_exact),
      implementation=implementation, interpret=interpret, tiles=tiles)
