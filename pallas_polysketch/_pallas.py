"""The Pallas path as differentiable ops: each a `jax.custom_vjp` around the
forward kernels, with the backward kernels as its VJP (DESIGN §1.4, §2).

States cross these functions in the backward kernels' orientation,
[S, z, 0] [B, K, r^2, H + 16] float32 ("rz"), and are transposed (a few KiB)
where the forward kernels want [S^T; z^T; 0].

- `causal(..., initial_state)`: causal attention from a given state; its VJP
  also returns the initial state's cotangent (context parallelism).
- `causal_with_state(..., state_block)`: also returns the state at the start of
  a block chosen per row (chunked prefill); its VJP takes that state's
  cotangent too (the dkv kernel adds it to its carry at that block).
- `state_sum(v, k_features)`: the whole-sequence state, and `apply_state`:
  the non-causal read of one; non-causal attention is their composition.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_polysketch._pallas_backward import (
    apply_state_backward, causal_backward, state_sum_backward)
from pallas_polysketch._pallas_common import outer_sum
from pallas_polysketch._pallas_forward import apply_state_forward, causal_forward


def _fwd_layout(state_rz):
  return None if state_rz is None else jnp.swapaxes(state_rz, -1, -2)


def _forward(static, q, k, v, q_features, k_features, initial_state, **kw):
  """causal_forward with static = (degree, block_size, local_exact, bias, tiles,
  interpret) and initial_state in the rz layout."""
  degree, block_size, local_exact, bias, tiles, interpret = static
  return causal_forward(q, k, v, q_features, k_features, degree=degree,
                        block_size=block_size, local_exact=local_exact, bias=bias,
                        tiles=tiles, interpret=interpret,
                        initial_state=_fwd_layout(initial_state), **kw)


def _backward(static, residuals, do, **kw):
  degree, block_size, local_exact, bias, tiles, interpret = static
  q, k, v, q_features, k_features, initial_state, o, den = residuals
  tiles.check_backward()
  grads, d_initial = causal_backward(
      q, k, v, q_features, k_features, o, den, do, degree=degree, block_size=block_size,
      local_exact=local_exact, tiles=tiles, interpret=interpret, initial_state=initial_state,
      **kw)
  return grads + (d_initial,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def causal(q, k, v, q_features, k_features, initial_state, static):
  """static: (degree, block_size, local_exact, bias, tiles, interpret)."""
  # Not differentiated: o straight in q's dtype (the VJP's forward keeps it in f32).
  return _forward(static, q, k, v, q_features, k_features, initial_state)[0]


def _causal_fwd(q, k, v, q_features, k_features, initial_state, static):
  o, den = _forward(static, q, k, v, q_features, k_features, initial_state,
                    out_dtype=jnp.float32)
  # Residuals: inputs, the float32 output (the backward's dden = -(g . O) / den
  # cancels against the state terms: a bf16 O costs 20x in the gradient where
  # v varies little around its mean) and the [B, N, 1, T] denominator; never states.
  return o.astype(q.dtype), (q, k, v, q_features, k_features, initial_state, o, den)


causal.defvjp(_causal_fwd, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def causal_with_state(q, k, v, q_features, k_features, initial_state, state_block, static):
  """(o, the rz state at the start of block state_block[b]); state_block int32 [B]."""
  o, _, state = _forward(static, q, k, v, q_features, k_features, initial_state,
                         state_block=state_block)
  return o, jnp.swapaxes(state, -1, -2)


def _causal_with_state_fwd(q, k, v, q_features, k_features, initial_state, state_block,
                           static):
  o, den, state = _forward(static, q, k, v, q_features, k_features, initial_state,
                           state_block=state_block, out_dtype=jnp.float32)
  residuals = (q, k, v, q_features, k_features, initial_state, o, den), state_block
  return (o.astype(q.dtype), jnp.swapaxes(state, -1, -2)), residuals


def _causal_with_state_bwd(static, residuals, cotangents):
  residuals, state_block = residuals
  do, d_state = cotangents
  grads = _backward(static, residuals, do, d_final_state=d_state, state_block=state_block)
  return grads + (None,)      # state_block: an integer, no cotangent


causal_with_state.defvjp(_causal_with_state_fwd, _causal_with_state_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def state_sum(v, k_features, static):
  """sum over tokens of Phi_k^T [V, 1]: rz [B, K, r^2, H + 16]. static: (block_size, tiles, interpret)."""
  block_size, tiles, interpret = static
  v_t = jnp.transpose(v, (0, 2, 3, 1))
  fk_t = jnp.transpose(k_features, (0, 2, 3, 1))
  return outer_sum(v_t, fk_t, block_size=block_size, vmem_limit_bytes=tiles.vmem_limit_bytes,
                   interpret=interpret)


def _state_sum_fwd(v, k_features, static):
  return state_sum(v, k_features, static), (v, k_features)


def _state_sum_bwd(static, residuals, d_state):
  block_size, tiles, interpret = static
  v, k_features = residuals
  tiles.check_backward()
  return state_sum_backward(v, k_features, d_state, block_size=block_size, tiles=tiles,
                            interpret=interpret)


state_sum.defvjp(_state_sum_fwd, _state_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def apply_state(q_features, state, out_spec, static):
  """o [B, T, N, H] from q_features [B, T, N, r] and an rz state.

  out_spec: (head_dim, out_dtype); static: (block_size, bias, tiles, interpret)."""
  head_dim, out_dtype = out_spec
  block_size, bias, tiles, interpret = static
  o, _ = apply_state_forward(q_features, _fwd_layout(state), head_dim=head_dim,
                             out_dtype=out_dtype, block_size=block_size, bias=bias,
                             tiles=tiles, interpret=interpret)
  return o


def _apply_state_fwd(q_features, state, out_spec, static):
  head_dim, out_dtype = out_spec
  block_size, bias, tiles, interpret = static
  o, den = apply_state_forward(q_features, _fwd_layout(state), head_dim=head_dim,
                               out_dtype=jnp.float32, mm_dtype=out_dtype,
                               block_size=block_size, bias=bias, tiles=tiles,
                               interpret=interpret)
  return o.astype(out_dtype), (q_features, state, o, den)


def _apply_state_bwd(out_spec, static, residuals, do):
  block_size, bias, tiles, interpret = static
  q_features, state, o, den = residuals
  tiles.check_backward()
  return apply_state_backward(q_features, state, o, den, do, block_size=block_size,
                              tiles=tiles, interpret=interpret)


apply_state.defvjp(_apply_state_fwd, _apply_state_bwd)


def to_rz(s, z):
  """Public (S [B, K, r^2, H], z [B, K, r^2]) -> rz [B, K, r^2, H + 16]."""
  pad = jnp.zeros((*z.shape, 15), jnp.float32)
  return jnp.concatenate([s.astype(jnp.float32), z[..., None].astype(jnp.float32), pad], -1)


def from_rz(state, head_dim):
  """rz [B, K, r^2, H + 16] -> public (S, z)."""
  return state[..., :head_dim], state[..., head_dim]
