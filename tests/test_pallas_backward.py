"""The custom VJP and the two backward kernels in interpret mode (DESIGN §1.4)."""
import dataclasses
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

import pallas_polysketch as ps
from pallas_polysketch import ref, tpu_config
from pallas_polysketch.polynomial import repeat_kv
from helpers import BACKENDS, PREFILL_GRADIENT_CASES, f32_tol, layer_inputs, rel_err

# f32: the kernels and jax.grad of the materialised reference sum the same
# terms in different orders; 1e-4 of each gradient's scale is far above that
# rounding and far below any missing or mis-scaled term.
F32_RTOL = 1e-4
# bf16 inputs: MXU operands (weights, states, dnum, phi) are rounded to bf16
# and gradients come back in bf16 (dq, dk, dv): several 2^-8 roundings.
BF16_RTOL = 5e-2
ARGNAMES = ("q", "k", "v", "q_features", "k_features")


def _inputs(key, b, t, n, h, r, dtype=jnp.float32):
  ks = jax.random.split(key, 6)
  q, k = (jax.random.normal(ks[i], (b, t, n, h)) / np.sqrt(h) for i in range(2))
  v = jax.random.normal(ks[2], (b, t, n, h))
  fq, fk = (jax.random.normal(ks[3 + i], (b, t, n, r)) / np.sqrt(r) for i in range(2))
  cotangent = jax.random.normal(ks[5], (b, t, n, h))
  return tuple(x.astype(dtype) for x in (q, k, v, fq, fk)), cotangent


def _grads(fn, args, cotangent):
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return jax.grad(loss, argnums=tuple(range(5)))(*args)


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)


CASES = [
    # (causal, local_exact, degree, h, r, t, block, local_tile, dtype, interpret)
    (True, True, 4, 64, 16, 300, 128, None, jnp.float32, True),
    pytest.param(True, True, 2, 64, 16, 256, 256, 128, jnp.float32, "tpu", marks=pytest.mark.slow),
    pytest.param(True, True, 8, 128, 32, 200, 128, None, jnp.float32, True, marks=pytest.mark.slow),
    pytest.param(True, False, 4, 64, 16, 300, 128, None, jnp.float32, True, marks=pytest.mark.slow),
    (True, False, 4, 64, 16, 256, 256, 128, jnp.float32, "tpu"),
    pytest.param(False, True, 4, 64, 16, 300, 128, None, jnp.float32, True, marks=pytest.mark.slow),
    (False, False, 4, 128, 32, 130, 128, None, jnp.float32, "tpu"),
    (True, True, 4, 64, 32, 300, 128, None, jnp.bfloat16, True),
    # Separate tiles: the forward in one 256 tile, the backward's diagonal block (dkv) in 128.
    (True, True, 4, 64, 16, 512, 256, {"local_tile": 256, "dkv_local_tile": 128},
     jnp.float32, True),
    pytest.param(False, True, 4, 64, 16, 256, 128, None, jnp.bfloat16, True, marks=pytest.mark.slow),
    # H = 128: q, k, v, dO, dq, dk, dv tokens on rows (H = 64 above: on lanes).
    (True, True, 4, 128, 16, 256, 256, 128, jnp.bfloat16, True),
    # Several blocks a grid step, each kernel its own count, 4 blocks: the dq
    # kernel's state and the dkv kernel's reverse carry cross sub-blocks and
    # steps (2 x 2), or stay in one step (4) beside one block a step (1).
    (True, True, 4, 64, 16, 512, 128, {"dq_blocks_per_step": 2, "dkv_blocks_per_step": 2},
     jnp.float32, "tpu"),
    (True, False, 4, 128, 16, 512, 128, {"dq_blocks_per_step": 1, "dkv_blocks_per_step": 4,
                                         "blocks_per_step": 2}, jnp.float32, True),
    # v6e's tiles in bf16: the split products stacked along the contraction.
    (True, True, 4, 64, 32, 512, 256, {"generation": "v6e"}, jnp.bfloat16, "tpu"),
    # H = 128 on v6e: the normaliser inside the MXU products (on v5e, the
    # default, H = 128 keeps it apart: `ResolvedTiles.normaliser_apart`).
    (True, True, 4, 128, 16, 512, 256, {"generation": "v6e"}, jnp.bfloat16, True),
]


def _tile_config(local_tile):
  """local_tile: None, an int (every kernel), or a dict of TileConfig tile fields."""
  if isinstance(local_tile, dict):
    return tpu_config.TileConfig(**local_tile)
  return tpu_config.TileConfig(local_tile=local_tile)


@pytest.mark.parametrize("causal,local_exact,degree,h,r,t,block,local_tile,dtype,interpret", CASES)
def test_gradients_match_quadratic_reference(causal, local_exact, degree, h, r, t, block,
                                             local_tile, dtype, interpret):
  args, cotangent = _inputs(jax.random.PRNGKey(t + r), 1, t, 2, h, r, dtype)
  kw = dict(degree=degree, block_size=block, causal=causal, local_exact=local_exact)
  interpret = pltpu.InterpretParams() if interpret == "tpu" else interpret
  got = _grads(lambda *a: ps.polysketch_attention(
      *a, implementation="pallas", interpret=interpret,
      tile_config=_tile_config(local_tile), **kw), args, cotangent)
  want = _grads(lambda *a: ref.polysketch_attention_quadratic(
      *(x.astype(jnp.float32) for x in a), **kw), args, cotangent)
  tol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
  for name, g, w, x in zip(ARGNAMES, got, want, args):
    assert g.shape == x.shape and g.dtype == x.dtype, name
    if not causal and name in ("q", "k"):
      # Non-causal attention sees q and k only through their features.
      np.testing.assert_array_equal(g, 0.0)
      continue
    assert _rel_err(g, w) < tol, (name, _rel_err(g, w))


def test_gqa_sketched_diagonal_h128_two_tiles():
  """The dkv kernel's diagonal block with everything at once: two query heads
  per kv head (dQ per head, dK and dV summed over the group), a sketched
  diagonal (df_q, df_k from it, added to the prefix's), H = 128 (tokens on
  rows) and two local tiles per block; against the xla path."""
  b, t, n, kv, h, r = 1, 512, 2, 1, 128, 16
  ks = jax.random.split(jax.random.PRNGKey(5), 6)
  q = jax.random.normal(ks[0], (b, t, n, h)) / np.sqrt(h)
  k = jax.random.normal(ks[1], (b, t, kv, h)) / np.sqrt(h)
  v = jax.random.normal(ks[2], (b, t, kv, h))
  fq = jax.random.normal(ks[3], (b, t, n, r)) / np.sqrt(r)
  fk = jax.random.normal(ks[4], (b, t, kv, r)) / np.sqrt(r)
  cotangent = jax.random.normal(ks[5], (b, t, n, h))
  kw = dict(block_size=256, local_exact=False)
  got = _grads(lambda *a: ps.polysketch_attention(
      *a, implementation="pallas", interpret=True,
      tile_config=tpu_config.TileConfig(local_tile=128), **kw), (q, k, v, fq, fk), cotangent)
  want = _grads(lambda *a: ps.polysketch_attention(*a, implementation="xla", **kw),
                (q, k, v, fq, fk), cotangent)
  for name, g, w in zip(ARGNAMES, got, want):
    if name in ("q", "k"):   # a sketched diagonal sees q and k only through the features
      np.testing.assert_array_equal(g, 0.0)
      continue
    assert _rel_err(g, w) < F32_RTOL, (name, _rel_err(g, w))


def test_check_grads_in_interpret_mode():
  args, _ = _inputs(jax.random.PRNGKey(11), 1, 136, 1, 64, 8)
  fn = lambda *a: ps.polysketch_attention(*a, block_size=128, implementation="pallas",
                                          interpret=True)
  check_grads(fn, args, order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)


def test_residuals_hold_no_per_block_state():
  """At T = 32k the VJP saves inputs, O and den: nothing of size (T/b) r^2 H."""
  b, t, n, h, r, block = 1, 32768, 2, 64, 32, 256
  shapes = [jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16)] * 3 + [
      jax.ShapeDtypeStruct((b, t, n, r), jnp.bfloat16)] * 2
  fn = lambda *a: ps.polysketch_attention(*a, block_size=block, implementation="pallas",
                                          interpret=True)
  residuals = jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *shapes))
  per_block_states = b * n * (t // block) * r * r * h
  assert residuals, "the VJP closed over nothing?"
  # Every residual is at most the size of q ([B, T, N, H]); per-block states
  # would be (r^2 / b) = 4x larger still.
  assert max(x.size for x in residuals) <= b * t * n * h < per_block_states // 2
  residual_bytes = sum(x.size * x.dtype.itemsize for x in residuals)
  input_bytes = sum(x.size * x.dtype.itemsize for x in shapes)
  # q, k, v, features, O (bf16) and den (f32): 2*(4H + 2r) + 4 bytes a token-head,
  # plus the padded copies jit may keep: at most twice that.
  per_token_head = residual_bytes / (b * t * n)
  assert per_token_head <= 2 * (2 * (4 * h + 2 * r) + 4)
  assert residual_bytes >= input_bytes


def test_training_through_kernel_matches_quadratic_reference():
  """A few AdamW steps of a tiny attention model: the same losses step for step."""
  key = jax.random.PRNGKey(0)
  b, t, d, n, h, r = 2, 160, 32, 2, 64, 8
  ks = jax.random.split(key, 6)
  x = jax.random.normal(ks[0], (b, t, d))
  target = jax.random.normal(ks[1], (b, t, d))
  params = {name: jax.random.normal(k_, shape) * 0.2 for name, k_, shape in (
      ("wq", ks[2], (d, n * h)), ("wk", ks[3], (d, n * h)), ("wv", ks[4], (d, n * h)),
      ("wo", ks[5], (n * h, d)))}
  sketch = ps.random_sketch_init(jax.random.PRNGKey(1), h, r, degree=4)

  def model(params, attention):
    def heads(w):
      y = (x @ w).reshape(b, t, n, h)
      return y / jnp.linalg.norm(y, axis=-1, keepdims=True)  # keep (q.k)^4 tame
    q, k, v = heads(params["wq"]), heads(params["wk"]), heads(params["wv"])
    fq, fk = ps.random_sketch_features(sketch, q), ps.random_sketch_features(sketch, k)
    o = attention(q, k, v, fq, fk)
    return jnp.mean((o.reshape(b, t, n * h) @ params["wo"] - target) ** 2)

  def train(attention):
    opt = optax.adamw(3e-2)
    state = opt.init(params)
    p, losses = params, []
    for _ in range(4):
      loss, grads = jax.value_and_grad(model)(p, attention)
      updates, state = opt.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      losses.append(float(loss))
    return np.array(losses)

  kw = dict(block_size=128)
  kernel = train(lambda *a: ps.polysketch_attention(*a, implementation="pallas",
                                                    interpret=True, **kw))
  reference = train(lambda *a: ref.polysketch_attention_quadratic(*a, **kw))
  assert reference[-1] < reference[0]  # it does train
  np.testing.assert_allclose(kernel, reference, rtol=1e-4)


def test_split_dot_keeps_float32_operands_to_2_pow_minus_16():
  """The backward's cancelling products in bf16 kernels: float32 operands as
  bf16 hi + lo pairs, three bf16 passes, carry about 16 bits, where one bf16
  rounding keeps 8; an exactly-bf16 operand (V) is not split."""
  from pallas_polysketch._pallas_common import NN_DIMS, split_dot, split_operand
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (64, 80), jnp.float32)
  b = jax.random.normal(kb, (80, 128), jnp.float32)
  exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  scale = np.abs(np.asarray(a, np.float64)) @ np.abs(np.asarray(b, np.float64))
  err = lambda got: float(np.max(np.abs(np.asarray(got, np.float64) - exact) / scale))
  assert err(split_dot(split_operand(a, True), split_operand(b, True), NN_DIMS)) < 2 ** -15
  # Stacked along the contraction (256-wide MXUs): the same three terms.
  stacked = split_dot(split_operand(a, True), split_operand(b, True), NN_DIMS, stack=True)
  assert err(stacked) < 2 ** -15
  np.testing.assert_allclose(stacked, split_dot(split_operand(a, True), split_operand(b, True),
                                                NN_DIMS), rtol=0, atol=2 ** -20 * np.max(scale))
  assert err(split_dot(split_operand(a, "exact"), split_operand(b, "exact"), NN_DIMS)) > 2 ** -10
  assert err(split_dot(split_operand(a, False), split_operand(b, False), NN_DIMS)) < 2 ** -20
  b16 = b.astype(jnp.bfloat16).astype(jnp.float32)
  exact = np.asarray(a, np.float64) @ np.asarray(b16, np.float64)
  parts = split_operand(b16, "exact")
  assert len(parts) == 1 and parts[0].dtype == jnp.bfloat16
  assert err(split_dot(split_operand(a, True), parts, NN_DIMS)) < 2 ** -15


# --- states in and out: prefill's gradients (DESIGN §1.5) -------------------------
#
# `prefill` is the public op that takes a prefix state (a DecodeState: S, z and
# the incomplete block's tokens) and returns the new one. Differentiating a
# loss of its output AND its returned state sends the backward kernels an
# initial state (dq kernel: S, z rebuilt from it; dkv kernel: its cotangent
# out) and a nonzero cotangent of the returned state, which the dkv kernel adds
# to its carry at the block the state was taken at, per row.

STATE_CASES = PREFILL_GRADIENT_CASES      # (helpers.py)
# The cases' cotangent scales for S and z: at the layer's magnitudes phi_k
# reaches (H / sqrt(r))^2 (about 256 at H = 64, r = 16) and S, z sum it over
# hundreds of tokens, so unit cotangents of S and z would swamp the output's
# share of dv and df_k; scaled, each term moves the gradients by thousands of
# tolerances (at least 100 asserted in the test).
LOSS_TERMS = ("out", "prefix_state", "normalizer")
STATE_GRADS = ("q", "k", "v", "q_features", "k_features", "prefix_state", "normalizer",
               "tail_k", "tail_v", "tail_k_features")


def _prefilled(case, seed=21):
  """(chunk, state, cotangents): per row, the DecodeState after that row's own
  prefix of LayerNorm'd inputs, as DESIGN §1.5 defines it (S, z summed over its
  complete blocks, the rest in the tail), the chunk that follows it, and
  cotangents for the output and the returned S and z."""
  heads, kv, h, r, local_exact, block, chunk_len, prefixes, (c_s, c_z) = case
  batch = len(prefixes)
  args, cot = layer_inputs(seed, batch, max(prefixes) + chunk_len, heads, kv, h, r)
  _, k, v, _, fk = args
  s0, z0, tails = [], [], []
  for row, p in enumerate(prefixes):
    done = p // block * block
    phi = ps.self_tensor(fk[row:row + 1, :done])
    s0.append(jnp.einsum("btkc,btkh->bkch", phi, v[row:row + 1, :done], precision="highest"))
    z0.append(jnp.sum(phi, axis=1))
    tails.append([jnp.pad(x[row:row + 1, done:p], ((0, 0), (0, block - (p - done)), (0, 0),
                                                   (0, 0))) for x in (k, v, fk)])
  tail_k, tail_v, tail_fk = (jnp.concatenate(xs, axis=0) for xs in zip(*tails))
  state = ps.DecodeState(
      prefix_state=jnp.concatenate(s0, axis=0), normalizer=jnp.concatenate(z0, axis=0),
      tail_k=tail_k, tail_v=tail_v, tail_k_features=tail_fk,
      fill=jnp.array([p % block for p in prefixes], jnp.int32), block_size=block,
      local_exact=local_exact)
  chunk = tuple(jnp.stack([x[row, p:p + chunk_len] for row, p in enumerate(prefixes)])
                for x in args)
  ks = jax.random.split(jax.random.key(seed + 1), 2)
  cotangents = dict(out=cot[:, :chunk_len],
                    prefix_state=c_s * jax.random.normal(ks[0], state.prefix_state.shape),
                    normalizer=c_z * jax.random.normal(ks[1], state.normalizer.shape))
  return chunk, state, cotangents


def _state_leaves(state):
  return (state.prefix_state, state.normalizer, state.tail_k, state.tail_v,
          state.tail_k_features)


def _prefill_grads(run, chunk, state, cotangents):
  """Gradients (named as STATE_GRADS) of the sum over LOSS_TERMS of <cotangent, value>
  for run(chunk, s0, z0, tail_k, tail_v, tail_fk) -> dict(out, prefix_state, normalizer)."""
  def loss(*a):
    got = run(a[:5], *a[5:])
    return sum(jnp.sum(got[t] * cotangents[t].astype(got[t].dtype)) for t in LOSS_TERMS)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(10))))(*chunk, *_state_leaves(state))
  return dict(zip(STATE_GRADS, grads))


def _prefill_op(state, block, local_exact, backend):
  def run(chunk, s0, z0, tail_k, tail_v, tail_fk):
    st = dataclasses.replace(state, prefix_state=s0, normalizer=z0, tail_k=tail_k,
                             tail_v=tail_v, tail_k_features=tail_fk)
    out, new = ps.prefill(*chunk, state=st, block_size=block, local_exact=local_exact,
                          **backend)
    return dict(out=out, prefix_state=new.prefix_state, normalizer=new.normalizer)
  return run


def _prefill_reference(fills, block, local_exact, degree=4):
  """prefill from the materialised weights (`ref.polysketch_weights`), row by row:
  the row's `fill` tail tokens then the chunk, blocks counted from the tail's
  start; the initial S, z read through phi_q and added to by the complete blocks."""
  def run(chunk, s0, z0, tail_k, tail_v, tail_fk):
    outs, ss, zs = [], [], []
    for row, fill in enumerate(fills):
      q, k, v, fq, fk = (x[row:row + 1] for x in chunk)
      n, t = q.shape[2], q.shape[1]
      before = lambda x: jnp.zeros((1, fill) + x.shape[2:], x.dtype)
      join = lambda tail, x: jnp.concatenate([tail[row:row + 1, :fill].astype(x.dtype), x], 1)
      q, fq = jnp.concatenate([before(q), q], 1), jnp.concatenate([before(fq), fq], 1)
      k, v, fk = join(tail_k, k), join(tail_v, v), join(tail_fk, fk)
      w = ref.polysketch_weights(q, k, fq, fk, degree=degree, block_size=block,
                                 causal=True, local_exact=local_exact)    # [1, N, L, L]
      group = n // k.shape[2]
      s_q, z_q = (jnp.repeat(x[row:row + 1], group, axis=1) for x in (s0, z0))
      phi_q = ps.self_tensor(fq)
      num = (jnp.einsum("bnij,bjnh->binh", w, repeat_kv(v, n))
             + jnp.einsum("binc,bnch->binh", phi_q, s_q))
      den = (1.0 + jnp.sum(w, axis=-1).transpose(0, 2, 1)
             + jnp.einsum("binc,bnc->bin", phi_q, z_q))
      outs.append((num / den[..., None])[:, fill:])
      complete = (fill + t) // block * block
      phi_k = ps.self_tensor(fk[:, :complete])
      ss.append(s0[row:row + 1] + jnp.einsum("bjkc,bjkh->bkch", phi_k, v[:, :complete]))
      zs.append(z0[row:row + 1] + jnp.sum(phi_k, axis=1))
    cat = lambda xs: jnp.concatenate(xs, axis=0)
    return dict(out=cat(outs), prefix_state=cat(ss), normalizer=cat(zs))
  return run


def _symmetric_part(g):
  """[B, K, r^2, ...] -> its part symmetric in the feature pair (a, c) of a r + c.

  Every state the op makes is symmetric in (a, c) (phi = f (x) f), and both
  backends read and return only a state's symmetric part (S + S^T) / 2, so only
  the symmetric part of a state's gradient is defined."""
  g = np.asarray(g)
  r = math.isqrt(g.shape[2])
  pairs = g.reshape(g.shape[:2] + (r, r) + g.shape[3:])
  return ((pairs + np.swapaxes(pairs, 2, 3)) / 2).reshape(g.shape)


def _reference_parts64(fills, block, local_exact, chunk, state, cotangents):
  """The reference's gradients in float64, of each loss term alone ({term: grads},
  the loss being linear in its cotangents), and as "out_from_zero" those of the
  output's term from a zero initial S, z. One compilation."""
  run = _prefill_reference(fills, block, local_exact)

  @jax.jit
  def parts(chunk, leaves, cotangents):
    (s0, z0, *tails) = leaves
    def vjp_from(s0, z0):
      return jax.vjp(lambda *a: run(a[:5], *a[5:]), *chunk, s0, z0, *tails)[1]
    vjp = vjp_from(s0, z0)
    only = lambda t: {u: c if u == t else jnp.zeros_like(c) for u, c in cotangents.items()}
    grads = {t: vjp(only(t)) for t in LOSS_TERMS}
    grads["out_from_zero"] = vjp_from(jnp.zeros_like(s0), jnp.zeros_like(z0))(only("out"))
    return grads

  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)
    grads = parts(to64(chunk), to64(_state_leaves(state)), to64(cotangents))
    return {t: _defined_part(dict(zip(STATE_GRADS, g))) for t, g in grads.items()}


def _defined_part(grads):
  """The gradients as numpy arrays, the initial state's symmetric part only."""
  return {name: _symmetric_part(g) if name in ("prefix_state", "normalizer") else np.asarray(g)
          for name, g in grads.items()}


def test_prefill_reads_the_symmetric_part_of_any_state():
  """phi . S reads only the part of S symmetric in (a, c). A state that is not
  symmetric gives, on both backends, what its symmetric part gives (the xla
  path once doubled the upper triangle instead) and returns a symmetric state."""
  case = STATE_CASES["sketched_gqa"]
  heads, kv, h, r, local_exact, block, chunk_len, prefixes, _ = case
  chunk, state, _ = _prefilled(case)
  s0 = state.prefix_state
  skew = jax.random.normal(jax.random.key(3), s0.shape) * jnp.std(s0)
  pairs = skew.reshape(s0.shape[:2] + (r, r) + s0.shape[3:])
  skew = (pairs - jnp.swapaxes(pairs, 2, 3)).reshape(s0.shape)    # antisymmetric in (a, c)
  tol = f32_tol(4, h)
  outs = {}
  for backend, kw in BACKENDS.items():
    for name, s in (("sym", s0), ("skewed", s0 + skew)):
      out, new = ps.prefill(*chunk, state=dataclasses.replace(state, prefix_state=s),
                            block_size=block, local_exact=local_exact, **kw)
      outs[backend, name] = (np.asarray(out), np.asarray(new.prefix_state))
    for i in range(2):
      assert rel_err(outs[backend, "skewed"][i], outs[backend, "sym"][i]) < tol, (backend, i)
  assert rel_err(outs["pallas", "skewed"][0], outs["xla", "skewed"][0]) < tol
  # Not vacuous: the skew is large against the state.
  assert rel_err(_symmetric_part(s0 + skew), np.asarray(s0 + skew)) > 0.3


# The TPU interpreter (random order of the parallel grid axes, NaN-filled
# scratch, simulated DMAs) besides plain interpret mode (DESIGN §3.2).
STATE_BACKENDS = dict(BACKENDS, pallas_tpu_interpreter=dict(
    implementation="pallas", interpret=pltpu.InterpretParams(random_seed=5)))


@pytest.mark.parametrize("case,backend", [
    pytest.param(case, backend, marks=pytest.mark.slow)    # CI time: one case suffices
    if (case, backend) == ("h128_gqa", "pallas_tpu_interpreter") else (case, backend)
    for case in STATE_CASES for backend in STATE_BACKENDS])
def test_prefill_gradients_through_initial_and_returned_state(case, backend):
  """jax.grad of <out, c_o> + <S_new, c_S> + <z_new, c_z> for prefill from a
  nonzero DecodeState, on both backends, against the float64 materialised
  reference: the gradients of q, k, v, both features, the initial S, z (their
  symmetric part, `_symmetric_part`) and the tail tokens. Each loss term and
  the initial state change the reference's gradients by far more than the
  tolerance, so dropping the returned state's cotangent (or adding it at the
  wrong block) or ignoring the initial state fails."""
  heads, kv, h, r, local_exact, block, chunk_len, prefixes, _ = STATE_CASES[case]
  chunk, state, cotangents = _prefilled(STATE_CASES[case])
  fills = [int(f) for f in np.asarray(state.fill)]
  assert fills == [p % block for p in prefixes]
  tol = f32_tol(4, h, grad=True)
  parts = _reference_parts64(fills, block, local_exact, chunk, state, cotangents)
  # The loss is linear in its cotangents: the gradient is the sum of the terms'.
  want = {name: sum(parts[t][name] for t in LOSS_TERMS) for name in STATE_GRADS}

  # Not vacuous: leaving out any loss term moves these gradients by > 100 tol ...
  for term, moved in (("out", ("v", "q_features", "k_features", "prefix_state")),
                      ("prefix_state", ("v", "k_features", "prefix_state")),
                      ("normalizer", ("k_features", "normalizer"))):
    for name in moved:
      assert rel_err(want[name] - parts[term][name], want[name]) > 100 * tol, (term, name)
  # ... and so does a zero initial state, in the output's gradients.
  assert rel_err(parts["out_from_zero"]["q_features"], parts["out"]["q_features"]) > 100 * tol

  got = _defined_part(_prefill_grads(
      _prefill_op(state, block, local_exact, STATE_BACKENDS[backend]), chunk, state, cotangents))
  for name in STATE_GRADS:
    assert got[name].shape == want[name].shape, name
    if not local_exact and name in ("q", "k", "tail_k"):
      # A sketched diagonal block sees q and k only through their features.
      np.testing.assert_array_equal(got[name], 0.0)
      np.testing.assert_array_equal(want[name], 0.0)
      continue
    assert rel_err(got[name], want[name]) < tol, (name, rel_err(got[name], want[name]))


def test_normaliser_apart_and_inside_agree():
  """H = 128: the backward with the normaliser's terms on the VPU (v5e's
  tiles: 128-wide MXU) and inside the MXU products (v6e's: 256-wide) give the
  same gradients, and the tiling says which one runs."""
  resolve = lambda gen, h: tpu_config.resolve_tiles(
      tpu_config.TileConfig(generation=gen), block_size=256, head_dim=h, sketch_dim=16,
      dtype=jnp.float32, feature_dtype=jnp.float32, group=2)
  assert resolve("v5e", 128).normaliser_apart and resolve("v4", 128).normaliser_apart
  assert not resolve("v6e", 128).normaliser_apart and not resolve("v5e", 64).normaliser_apart
  # v5e's phi shares the rotations by 4 of two feature tiles (r = 16: 136 rows), v6e's not
  # (144): the gradients below cross both plans too.
  assert resolve("v5e", 128).merged_rotations and not resolve("v6e", 128).merged_rotations
  # At H = 128 v5e's dq kernel walks 4 blocks a step (8 at H = 64); a given count is kept.
  assert resolve("v5e", 128).dq_blocks_per_step == 4
  assert resolve("v5e", 64).dq_blocks_per_step == 8
  assert tpu_config.resolve_tiles(
      tpu_config.TileConfig(generation="v5e", dq_blocks_per_step=2), block_size=256,
      head_dim=128, sketch_dim=16, dtype=jnp.float32,
      feature_dtype=jnp.float32).dq_blocks_per_step == 2
  args, cotangent = _inputs(jax.random.PRNGKey(7), 1, 512, 4, 128, 16, jnp.float32)
  k, v, fk = (x[:, :, ::2] for x in (args[1], args[2], args[4]))    # GQA: 2 kv heads
  args = (args[0], k, v, args[3], fk)
  grads = {gen: _grads(lambda *a: ps.polysketch_attention(
      *a, block_size=256, implementation="pallas", interpret=True,
      tile_config=tpu_config.TileConfig(generation=gen, local_tile=128)), args, cotangent)
      for gen in ("v5e", "v6e")}
  for name, a, b in zip(ARGNAMES, grads["v5e"], grads["v6e"]):
    assert _rel_err(a, b) < F32_RTOL, (name, _rel_err(a, b))
