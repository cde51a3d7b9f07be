"""The fused forward kernel in interpret mode against the references (DESIGN §3.2)."""
import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import pallas_polysketch as ps
from pallas_polysketch import _pallas, _pallas_forward, ref, tpu_config
from pallas_polysketch.sketches import self_tensor

F32_RTOL = 1e-5
# bf16 inputs: the kernel feeds the MXU bf16 operands (the local weights, the
# state and phi are rounded to 8 mantissa bits, relative error <= 2^-8 each)
# and accumulates in f32. The reference computes in f32 from the same bf16
# inputs, so a few roundings of 0.4% bound the error: 3e-2 of the output scale.
BF16_RTOL = 3e-2


def _inputs(key, b, t, n, h, r, dtype=jnp.float32, scale=None):
  ks = jax.random.split(key, 5)
  scale = scale or 1.0 / np.sqrt(h)
  q, k, v = (jax.random.normal(ks[i], (b, t, n, h)) * (scale if i < 2 else 1.0)
             for i in range(3))
  fq, fk = (jax.random.normal(ks[3 + i], (b, t, n, r)) / np.sqrt(r) for i in range(2))
  return tuple(x.astype(dtype) for x in (q, k, v, fq, fk))


def _rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


CASES = [
    # (causal, local_exact, degree, head_dim, sketch_dim, seq, block, local_tile, dtype)
    (True, True, 4, 64, 16, 300, 128, None, jnp.float32),
    pytest.param(True, True, 2, 64, 16, 256, 256, 128, jnp.float32, marks=pytest.mark.slow),
    pytest.param(True, True, 8, 128, 32, 200, 128, None, jnp.float32, marks=pytest.mark.slow),
    (True, False, 4, 64, 16, 300, 128, None, jnp.float32),
    pytest.param(True, False, 4, 128, 16, 256, 256, 128, jnp.float32, marks=pytest.mark.slow),
    (False, True, 4, 64, 16, 300, 128, None, jnp.float32),
    (False, False, 4, 128, 32, 130, 128, None, jnp.float32),
    pytest.param(True, True, 4, 64, 64, 256, 128, None, jnp.float32, marks=pytest.mark.slow),
    (True, True, 4, 64, 32, 300, 128, None, jnp.bfloat16),
    pytest.param(True, False, 4, 128, 16, 256, 256, 128, jnp.bfloat16, marks=pytest.mark.slow),
    (False, True, 4, 64, 16, 300, 128, None, jnp.bfloat16),
    # H = 128: the causal kernel takes q, k, v, o with tokens on rows (H = 64
    # above: tokens on lanes, q and k transposed in VMEM); two local tiles.
    (True, True, 4, 128, 16, 256, 256, 128, jnp.bfloat16),
]


@pytest.mark.parametrize("causal,local_exact,degree,h,r,t,block,local_tile,dtype", CASES)
def test_forward_matches_quadratic_reference(causal, local_exact, degree, h, r, t, block,
                                             local_tile, dtype):
  args = _inputs(jax.random.PRNGKey(t + h + r), 2, t, 2, h, r, dtype)
  kw = dict(degree=degree, block_size=block, causal=causal, local_exact=local_exact)
  got = ps.polysketch_attention(*args, implementation="pallas", interpret=True,
                                tile_config=tpu_config.TileConfig(local_tile=local_tile), **kw)
  want = ref.polysketch_attention_quadratic(*(x.astype(jnp.float32) for x in args), **kw)
  assert got.shape == args[0].shape and got.dtype == dtype
  tol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
  assert _rel_err(got, want) < tol
  if dtype == jnp.float32:
    xla = ps.polysketch_attention(*args, implementation="xla", **kw)
    assert _rel_err(got, xla) < F32_RTOL


@pytest.mark.parametrize("causal", [True, False])
def test_tpu_interpreter_matches_plain_interpret(causal):
  args = _inputs(jax.random.PRNGKey(1), 2, 256, 2, 64, 16)
  kw = dict(block_size=128, causal=causal, implementation="pallas")
  plain = ps.polysketch_attention(*args, interpret=True, **kw)
  tpu_sim = ps.polysketch_attention(*args, interpret=pltpu.InterpretParams(), **kw)
  want = ref.polysketch_attention_quadratic(*args, block_size=128, causal=causal)
  assert _rel_err(tpu_sim, want) < F32_RTOL
  assert _rel_err(plain, want) < F32_RTOL


def test_block_axis_marked_parallel_is_caught_by_tpu_interpreter(monkeypatch):
  """The state-carrying block axis must be "arbitrary": with "parallel" the TPU
  interpreter (fresh NaN scratch, parallel semantics) gives a wrong answer,
  while plain interpret mode does not notice."""
  q, k, v, fq, fk = _inputs(jax.random.PRNGKey(2), 2, 512, 2, 64, 16)
  # Two grid steps of two blocks each: the state crosses steps and sub-blocks.
  tiles = tpu_config.resolve_tiles(tpu_config.TileConfig(blocks_per_step=2), block_size=128,
                                   head_dim=64, sketch_dim=16, dtype=q.dtype,
                                   feature_dtype=fq.dtype)
  want = ref.polysketch_attention_quadratic(q, k, v, fq, fk, block_size=128)
  kw = dict(degree=4, block_size=128, local_exact=True, bias=1.0, tiles=tiles)

  def run(interpret):
    o, _ = _pallas_forward.causal_forward(q, k, v, fq, fk, interpret=interpret, **kw)
    return np.asarray(o)

  assert _rel_err(run(pltpu.InterpretParams(random_seed=0)), want) < F32_RTOL
  monkeypatch.setattr(_pallas_forward, "BLOCK_AXIS_SEMANTICS", "parallel")
  assert _rel_err(run(True), want) < F32_RTOL  # plain interpret cannot tell
  wrong = run(pltpu.InterpretParams(random_seed=0))
  assert not np.allclose(wrong, np.asarray(want), rtol=1e-3, atol=1e-3)


def test_final_state_is_sum_of_key_features_times_values():
  q, k, v, fq, fk = _inputs(jax.random.PRNGKey(3), 1, 256, 2, 64, 16)
  tiles = tpu_config.resolve_tiles(None, block_size=128, head_dim=64, sketch_dim=16,
                                   dtype=q.dtype, feature_dtype=fq.dtype)
  phi_k = self_tensor(fk)                                   # [B, T, N, r^2]
  s_want = jnp.einsum("btnc,btnh->bnhc", phi_k, v)          # S^T
  z_want = jnp.sum(phi_k, axis=1)                           # [B, N, r^2]
  _, den, state = _pallas_forward.causal_forward(
      q, k, v, fq, fk, degree=4, block_size=128, local_exact=True, bias=1.0, tiles=tiles,
      interpret=True, state_block=jnp.array([2]))           # after both blocks
  summed = jnp.swapaxes(_pallas.state_sum(v, fk, (128, tiles, True)), -1, -2)
  assert den.shape == (1, 2, 1, 256)
  for got in (state, summed):
    np.testing.assert_allclose(got[:, :, :64, :], s_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, :, 64, :], z_want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, :, 65:, :], 0.0)
  # The state at the start of block 1: the first block's keys only.
  _, _, first = _pallas_forward.causal_forward(
      q, k, v, fq, fk, degree=4, block_size=128, local_exact=True, bias=1.0, tiles=tiles,
      interpret=True, state_block=jnp.array([1]))
  s_first = jnp.einsum("btnc,btnh->bnhc", phi_k[:, :128], v[:, :128])
  np.testing.assert_allclose(first[:, :, :64, :], s_first, rtol=1e-5, atol=1e-5)


def test_exact_features_make_pallas_equal_polynomial_attention():
  """f(x) = x (x) x gives (f_q . f_k)^2 = (q . k)^4: the whole op is exact."""
  q, k, v, _, _ = _inputs(jax.random.PRNGKey(4), 1, 200, 2, 8, 8)
  fq, fk = self_tensor(q), self_tensor(k)                     # r = 64
  got = ps.polysketch_attention(q, k, v, fq, fk, degree=4, block_size=128,
                                implementation="pallas", interpret=True)
  want = ps.polynomial_attention(q, k, v, degree=4)
  assert _rel_err(got, want) < F32_RTOL


def test_pallas_without_tpu_or_interpret_raises_clear_error():
  args = _inputs(jax.random.PRNGKey(5), 1, 64, 1, 64, 16)
  with pytest.raises(ValueError, match="interpret=True"):
    ps.polysketch_attention(*args, implementation="pallas")


def test_default_implementation_on_cpu_is_the_xla_path():
  args = _inputs(jax.random.PRNGKey(6), 1, 100, 2, 64, 16)
  got = ps.polysketch_attention(*args, block_size=64)
  want = ps.polysketch_attention(*args, block_size=64, implementation="xla")
  np.testing.assert_array_equal(got, want)


def test_tile_config_errors():
  args = _inputs(jax.random.PRNGKey(7), 1, 256, 1, 64, 16)
  with pytest.raises(ValueError, match="local_tile=96 must divide block_size=256"):
    ps.polysketch_attention(*args, implementation="pallas", interpret=True,
                            tile_config=tpu_config.TileConfig(local_tile=96))
  with pytest.raises(ValueError, match="multiple of 128"):
    ps.polysketch_attention(*args, block_size=128, implementation="pallas", interpret=True,
                            tile_config=tpu_config.TileConfig(local_tile=64))
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    tpu_config.TileConfig(generation="v9")
  # a truthy string such as "no" turned bf16 phi on
  with pytest.raises(TypeError, match="bf16_phi must be a bool, got 'no'"):
    tpu_config.TileConfig(bf16_phi="no")
  with pytest.raises(TypeError, match="tile_config must be a TileConfig"):
    ps.polysketch_attention(*args, tile_config={"local_tile": 128})


def test_explicit_local_tile_with_a_block_clamped_to_a_short_sequence():
  """block_size=256 with TileConfig(local_tile=128) on a sequence shorter than
  the block (one block, clamped to the 8-rounded seq, 136): it raised "local_tile=128
  must divide block_size=136", a block the caller never passed, on every
  implementation but "xla" (None too, off TPU); the block is now its own tile."""
  args = _inputs(jax.random.PRNGKey(3), 1, 130, 1, 64, 16)
  want = ref.polysketch_attention_quadratic(*args, block_size=256)
  tc = tpu_config.TileConfig(local_tile=128, dkv_local_tile=128)
  for kw in (dict(implementation="pallas", interpret=True), dict(implementation=None)):
    got = ps.polysketch_attention(*args, block_size=256, tile_config=tc, **kw)
    assert _rel_err(got, want) < F32_RTOL


@pytest.mark.parametrize("generation", sorted(tpu_config.GENERATIONS))
def test_for_generation_is_the_generations_defaults(generation):
  """Its explicit tiles made a block the MXU width does not divide (one block
  covering a short sequence, e.g. 192) raise "local_tile=128 must divide
  block_size=192", which TileConfig(generation=...) accepts."""
  for block in (192, 256, 384):
    kw = dict(block_size=block, head_dim=64, sketch_dim=16, dtype=jnp.float32,
              feature_dtype=jnp.float32)
    assert (tpu_config.resolve_tiles(tpu_config.TileConfig.for_generation(generation), **kw)
            == tpu_config.resolve_tiles(tpu_config.TileConfig(generation=generation), **kw))


def test_vmem_budget_error_names_the_limit():
  # b = 1024 with r = 64 needs phi tiles of 4096 x 1024 floats: too big for v4.
  with pytest.raises(ValueError, match=r"over the v4's 16 MiB of VMEM"):
    tpu_config.resolve_tiles(tpu_config.TileConfig(generation="v4"), block_size=1024,
                             head_dim=128, sketch_dim=64, dtype=jnp.bfloat16,
                             feature_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="over vmem_limit_bytes"):
    tpu_config.resolve_tiles(tpu_config.TileConfig(vmem_limit_bytes=1 << 20), block_size=256,
                             head_dim=64, sketch_dim=32, dtype=jnp.bfloat16,
                             feature_dtype=jnp.bfloat16)



def test_tile_config_sizes_are_ints():
  """vmem_limit_bytes="16MiB" failed with a bare "'<=' not supported" and True
  was a 1-byte limit; a NumPy int tile or count was refused as "must be a
  positive multiple of 8, got np.int64(128)"; a list generation raised
  "unhashable type"."""
  for bad in ("16MiB", True, 16e6, 0, -1):
    with pytest.raises(ValueError, match=rf"vmem_limit_bytes must be a positive int, got {re.escape(repr(bad))}"):
      tpu_config.TileConfig(vmem_limit_bytes=bad)
  t = tpu_config.TileConfig(local_tile=np.int64(128), dkv_local_tile=np.int32(256),
                            blocks_per_step=np.int64(2), vmem_limit_bytes=np.int64(1 << 24))
  assert (t.local_tile, t.dkv_local_tile, t.blocks_per_step, t.vmem_limit_bytes) == (
      128, 256, 2, 1 << 24)
  assert all(type(x) is int for x in (t.local_tile, t.dkv_local_tile, t.blocks_per_step,
                                      t.vmem_limit_bytes))
  assert t == tpu_config.TileConfig(local_tile=128, dkv_local_tile=256, blocks_per_step=2,
                                    vmem_limit_bytes=1 << 24)
  with pytest.raises(ValueError, match=r"unknown TPU generation \['v5e'\]; known"):
    tpu_config.TileConfig(generation=["v5e"])
  with pytest.raises(ValueError, match=r"unknown TPU generation 'v7'; known: \['v4', 'v5e', "
                                       r"'v5p', 'v6e'\]"):
    tpu_config.TileConfig.for_generation("v7")

def test_backward_tiles_resolve_per_kernel():
  """dkv_local_tile (the backward's diagonal block): an explicit value wins;
  None follows an explicit local_tile, else the generation's default; the dkv
  kernel's VMEM is estimated with it."""
  resolve = lambda **kw: tpu_config.resolve_tiles(
      tpu_config.TileConfig(**kw), block_size=256, head_dim=64, sketch_dim=32,
      dtype=jnp.bfloat16, feature_dtype=jnp.bfloat16)
  t = resolve(generation="v5e", local_tile=256, dkv_local_tile=128)
  assert (t.local_tile, t.dkv_local_tile) == (256, 128)
  est = tpu_config.vmem_estimates(256, 64, 32, jnp.bfloat16, jnp.bfloat16, local_tile=128,
                                  dkv_local_tile=256)
  base = tpu_config.vmem_estimates(256, 64, 32, jnp.bfloat16, jnp.bfloat16, local_tile=128)
  assert est["dkv"] > base["dkv"] and (est["dq"], est["forward"]) == (base["dq"], base["forward"])
  t = resolve(generation="v5e", local_tile=128)
  assert (t.local_tile, t.dkv_local_tile) == (128, 128)
  v5e = tpu_config.GENERATIONS["v5e"]
  own = tpu_config.vmem_estimates(256, 64, 32, jnp.bfloat16, jnp.bfloat16, local_tile=128,
                                  dq_blocks_per_step=v5e.dq_blocks_per_step,
                                  dkv_blocks_per_step=v5e.dkv_blocks_per_step)
  assert t.backward_vmem_estimate_bytes == max(own["dq"], own["dkv"])
  for name, gen in tpu_config.GENERATIONS.items():
    t = resolve(generation=name)
    assert t.dkv_local_tile == min(gen.dkv_local_tile or gen.mxu_width, 256)
  with pytest.raises(ValueError, match=r"TileConfig.dkv_local_tile=384 must divide block_size=512"):
    tpu_config.resolve_tiles(tpu_config.TileConfig(dkv_local_tile=384), block_size=512,
                             head_dim=64, sketch_dim=32, dtype=jnp.bfloat16,
                             feature_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"dkv_local_tile must be a positive multiple of 8, got 100"):
    tpu_config.TileConfig(dkv_local_tile=100)
  with pytest.raises(ValueError, match=r"TileConfig.dkv_local_tile=64 must be a multiple of 128"):
    resolve(dkv_local_tile=64)
  with pytest.raises(TypeError, match="dq_local_tile"):
    tpu_config.TileConfig(dq_local_tile=128)   # the dq kernel has no diagonal block


def test_blocks_per_step_resolve_per_kernel():
  """dq_ / dkv_blocks_per_step: an explicit value wins; None follows an
  explicit blocks_per_step, else the generation's default per kernel; each
  kernel's VMEM estimate counts its own pipelined blocks; bad counts say why."""
  resolve = lambda **kw: tpu_config.resolve_tiles(
      tpu_config.TileConfig(**kw), block_size=256, head_dim=64, sketch_dim=32,
      dtype=jnp.bfloat16, feature_dtype=jnp.bfloat16)
  counts = lambda t: (t.blocks_per_step, t.dq_blocks_per_step, t.dkv_blocks_per_step)
  assert counts(resolve(blocks_per_step=2, dkv_blocks_per_step=3)) == (2, 2, 3)
  assert counts(resolve(dq_blocks_per_step=5)) == (
      tpu_config.GENERATIONS["v5e"].forward_blocks_per_step, 5,
      tpu_config.GENERATIONS["v5e"].dkv_blocks_per_step)
  for name, gen in tpu_config.GENERATIONS.items():
    assert counts(resolve(generation=name)) == (
        gen.forward_blocks_per_step, gen.dq_blocks_per_step, gen.dkv_blocks_per_step)
  est = lambda **kw: tpu_config.vmem_estimates(256, 64, 32, jnp.bfloat16, jnp.bfloat16,
                                               local_tile=128, **kw)
  base, more = est(), est(dq_blocks_per_step=4)
  assert more["dq"] > base["dq"] and (more["forward"], more["dkv"]) == (base["forward"],
                                                                      base["dkv"])
  more = est(dkv_blocks_per_step=4)
  assert more["dkv"] > base["dkv"] and (more["forward"], more["dq"]) == (base["forward"],
                                                                       base["dq"])
  # A default count is halved until its kernel fits the generation's VMEM; a
  # given one is kept and refused when it does not fit.
  big = lambda **kw: tpu_config.resolve_tiles(
      tpu_config.TileConfig(generation="v4", **kw), block_size=256, head_dim=128,
      sketch_dim=64, dtype=jnp.bfloat16, feature_dtype=jnp.bfloat16, group=2)
  v4 = tpu_config.GENERATIONS["v4"]
  t = big()
  assert 1 <= t.blocks_per_step < v4.forward_blocks_per_step
  assert t.vmem_estimate_bytes <= v4.vmem_bytes
  with pytest.raises(ValueError, match=r"forward kernel needs about .* with 8 block\(s\) a "
                                       r"grid step: .* a smaller TileConfig.blocks_per_step"):
    big(blocks_per_step=8)
  for name in ("blocks_per_step", "dq_blocks_per_step", "dkv_blocks_per_step"):
    for bad in (0, -1, 2.0, True):
      with pytest.raises(ValueError, match=rf"{name} must be a positive int, got {bad!r}"):
        tpu_config.TileConfig(**{name: bad})


def test_per_generation_defaults():
  for name, gen in tpu_config.GENERATIONS.items():
    tiles = tpu_config.resolve_tiles(tpu_config.TileConfig.for_generation(name),
                                     block_size=256, head_dim=64, sketch_dim=32,
                                     dtype=jnp.bfloat16, feature_dtype=jnp.bfloat16)
    assert tiles.local_tile == min(gen.mxu_width, 256)
    # GPT-2 head shape fits the default scoped VMEM everywhere: no override.
    assert tiles.vmem_limit_bytes is None
  big = tpu_config.resolve_tiles(tpu_config.TileConfig(generation="v5e"), block_size=512,
                                 head_dim=128, sketch_dim=64, dtype=jnp.bfloat16,
                                 feature_dtype=jnp.bfloat16)
  assert big.vmem_estimate_bytes > tpu_config.GENERATIONS["v5e"].default_scoped_vmem_bytes
  assert big.vmem_limit_bytes > big.vmem_estimate_bytes


def test_bf16_phi_is_bit_identical_and_on_by_default_only_on_v6e():
  """Forming phi in bf16 (v6e's default) gives exactly the bits of the f32 route."""
  args = _inputs(jax.random.PRNGKey(8), 1, 256, 2, 64, 32, jnp.bfloat16)
  outs = [ps.polysketch_attention(*args, block_size=128, causal=causal, implementation="pallas",
                                  interpret=True,
                                  tile_config=tpu_config.TileConfig(bf16_phi=flag))
          for causal in (True, False) for flag in (False, True)]
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[2], outs[3])
  for name in tpu_config.GENERATIONS:
    tiles = tpu_config.resolve_tiles(tpu_config.TileConfig(generation=name), block_size=256,
                                     head_dim=64, sketch_dim=32, dtype=jnp.bfloat16,
                                     feature_dtype=jnp.bfloat16)
    assert tiles.bf16_phi == (name == "v6e")


@pytest.mark.parametrize("r", [32, 64, 12])
def test_symmetric_phi_gives_the_same_scores_with_fewer_pairs(r):
  """phi_sym_q . phi_sym_k = phi_q . phi_k for every token pair, with
  r(r + 8)/2 pairs when 8 divides r (r = 32: 640 of 1024), else all r^2."""
  from pallas_polysketch import _pallas_common as common
  key_q, key_k = jax.random.split(jax.random.PRNGKey(r))
  fq_t = jax.random.normal(key_q, (r, 128), jnp.float32)
  fk_t = jax.random.normal(key_k, (r, 128), jnp.float32)
  want = common.phi_t(fq_t).T @ common.phi_t(fk_t)                     # [q token, k token]
  sym_q = common.phi_sym_t(fq_t, jnp.float32, jnp.float32, query=True)
  sym_k = common.phi_sym_t(fk_t, jnp.float32, jnp.float32, query=False)
  pairs = common.sym_pairs(r)
  assert sym_q.shape == sym_k.shape == (len(pairs), 128)
  assert len(pairs) == (r * (r + 8) // 2 if r % 8 == 0 else r * r)
  got = sym_q.T @ sym_k
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("r", [16, 24, 32, 64, 12])
def test_rotated_phi_gives_the_same_scores_with_whole_vreg_pieces(r, packed):
  """The forward's phi (`phi_rot_t`): rows are exactly f_a f_c of `rot_pairs`
  (bf16 features, formed in bf16 or float32 alike), every unordered pair is
  kept, and phi_rot_q . phi_rot_k = phi_q . phi_k; r = 32 keeps 576 rows
  packed, 528 in float32 (each pair once; `sym_pairs` keeps 640)."""
  from pallas_polysketch import _pallas_common as common
  dtype = jnp.bfloat16 if packed else jnp.float32
  key_q, key_k = jax.random.split(jax.random.PRNGKey(r))
  fq_t = jax.random.normal(key_q, (r, 128), jnp.float32).astype(dtype)
  fk_t = jax.random.normal(key_k, (r, 128), jnp.float32).astype(dtype)
  pairs = common.rot_pairs(r, packed)
  if r % 8 == 0:
    assert {(min(a, c), max(a, c)) for a, c in pairs} == {
        (a, c) for a in range(r) for c in range(a, r)}
  if r == 32:
    assert len(pairs) == (576 if packed else 528)
  if r % 16 == 0 and not packed:      # the rotations by 4 of tile pairs share pieces
    assert len(pairs) == r * (r + 1) // 2
  form = jax.jit(lambda f, form_dtype, query: common.phi_rot_t(
      f, form_dtype, jnp.float32, query=query, packed=packed), static_argnums=(1, 2))
  rows_k = form(fk_t, dtype, False)
  f = np.asarray(fk_t.astype(jnp.float32))
  want_rows = np.stack([f[a] * f[c] for a, c in pairs]).astype(dtype).astype(np.float32)
  np.testing.assert_array_equal(rows_k, want_rows)
  if packed:      # forming in float32 gives the same bits (bf16 products are exact)
    np.testing.assert_array_equal(form(fk_t, jnp.float32, False).astype(dtype), rows_k)
  want = common.phi_t(fq_t.astype(jnp.float32)).T @ common.phi_t(fk_t.astype(jnp.float32))
  got = (form(fq_t, jnp.float32, True).T @ form(fk_t, jnp.float32, False))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))


def test_rotated_state_round_trip():
  """States cross the forward kernel's boundary on all r^2 pairs, its own
  `rot_pairs` (some twice) inside."""
  from pallas_polysketch import _pallas_common as common
  r, h = 32, 24
  f = jax.random.normal(jax.random.PRNGKey(0), (40, r))
  v = jax.random.normal(jax.random.PRNGKey(1), (40, h))
  phi = (f[:, :, None] * f[:, None, :]).reshape(40, r * r)
  state = (phi.T @ v).T                                                 # [h, r^2], symmetric
  for packed in (False, True):
    pairs = common.rot_pairs(r, packed)
    sym = common.sym_state(state, axis=-1, pairs=pairs)
    assert sym.shape == (h, len(pairs))
    np.testing.assert_array_equal(common.full_state(sym, r, axis=-1, pairs=pairs), state)


def test_symmetric_state_round_trip():
  """A state crosses the kernel boundary on all r^2 pairs: full -> kept pairs
  -> full is the identity on symmetric states and the symmetric part (all
  phi reads) of any other."""
  from pallas_polysketch import _pallas_common as common
  r, h = 16, 24
  f = jax.random.normal(jax.random.PRNGKey(0), (40, r))
  v = jax.random.normal(jax.random.PRNGKey(1), (40, h))
  phi = (f[:, :, None] * f[:, None, :]).reshape(40, r * r)
  state = (phi.T @ v).T                                                 # [h, r^2], symmetric
  sym = common.sym_state(state, axis=-1)
  assert sym.shape == (h, len(common.sym_pairs(r)))
  np.testing.assert_array_equal(common.full_state(sym, r, axis=-1), state)
  np.testing.assert_array_equal(common.sym_state(state.T, axis=0), sym.T)
  skew = jax.random.normal(jax.random.PRNGKey(2), (h, r * r))
  back = common.full_state(common.sym_state(skew, axis=-1), r, axis=-1)
  sym_part = 0.5 * (skew + skew.reshape(h, r, r).transpose(0, 2, 1).reshape(h, r * r))
  np.testing.assert_allclose(back, sym_part, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("query", [True, False])
@pytest.mark.parametrize("r", [16, 12])
def test_symmetric_phi_vjp_is_the_gradient(r, query):
  from pallas_polysketch import _pallas_common as common
  f_t = jax.random.normal(jax.random.PRNGKey(r), (r, 128), jnp.float32)
  dphi = jax.random.normal(jax.random.PRNGKey(1), (len(common.sym_pairs(r)), 128), jnp.float32)
  _, vjp = jax.vjp(lambda f: common.phi_sym_t(f, jnp.float32, jnp.float32, query=query), f_t)
  np.testing.assert_allclose(common.phi_sym_vjp(dphi, f_t, query=query), vjp(dphi)[0],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query", [True, False])
@pytest.mark.parametrize("r", [32, 24, 16, 12])
def test_rotated_phi_vjp_is_the_gradient(r, query):
  """The backward kernels' phi cotangent (`phi_rot_vjp`) is the gradient of
  the rows of `phi_rot_t` (float32 pieces), written independently here as
  w f_a f_c over `rot_pairs` (w: the query side's piece weights)."""
  from pallas_polysketch import _pallas_common as common
  pairs = common.rot_pairs(r, False)
  plan = common.rot_plan(r, False)
  weights = (np.repeat([w for *_, w in plan[0]], 8).astype(np.float32)
             if plan and query else np.ones(len(pairs), np.float32))
  a_idx, c_idx = (np.array(x) for x in zip(*pairs))
  f_t = jax.random.normal(jax.random.PRNGKey(r), (r, 256), jnp.float32)
  dphi = jax.random.normal(jax.random.PRNGKey(1), (len(pairs), 256), jnp.float32)
  rows = lambda f: weights[:, None] * f[a_idx] * f[c_idx]
  formed = jax.jit(lambda f: common.phi_rot_t(f, jnp.float32, jnp.float32, query=query,
                                              packed=False))(f_t)
  np.testing.assert_allclose(formed, rows(f_t), rtol=1e-6, atol=1e-6)
  _, vjp = jax.vjp(rows, f_t)
  got = jax.jit(lambda d, f: common.phi_rot_vjp(d, f, query=query))(dphi, f_t)
  np.testing.assert_allclose(got, vjp(dphi)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_h128_forward_from_a_prefix_state_and_emitting_one(dtype):
  """H = 128 (q, k, v, o tokens on rows) on v5e's and v6e's tiles: the output
  from a real prefix state (chunked prefill, context parallelism) and the
  state returned mid-sequence and at the end, z row included, GQA (two query
  heads per kv head), against the reference and across the two tilings."""
  b, t, n, kv, h, r, block = 2, 768, 4, 2, 128, 16, 256
  q, k, v, fq, fk = (x.astype(dtype).astype(jnp.float32)
                     for x in _inputs(jax.random.PRNGKey(11), b, 256 + t, n, h, r))
  k, v, fk = (x[:, :, ::n // kv] for x in (k, v, fk))
  phi_k = self_tensor(fk)                                              # [B, T, K, r^2]
  state_at = lambda end: jnp.concatenate(                              # [B, K, H + 16, r^2]
      [jnp.einsum("btnc,btnh->bnhc", phi_k[:, :end], v[:, :end]),
       jnp.sum(phi_k[:, :end], axis=1)[:, :, None],
       jnp.zeros((b, kv, 15, r * r))], axis=2)
  rep = lambda x: jnp.repeat(x, n // kv, axis=2)                       # GQA reference
  want = ref.polysketch_attention_quadratic(q, rep(k), rep(v), fq, rep(fk),
                                            block_size=block)[:, 256:]
  chunk = lambda x: x[:, 256:].astype(dtype)
  results = {}
  for gen in ("v5e", "v6e"):
    tiles = tpu_config.resolve_tiles(tpu_config.TileConfig(generation=gen, local_tile=128),
                                     block_size=block, head_dim=h, sketch_dim=r, dtype=dtype,
                                     feature_dtype=dtype, group=n // kv)
    results[gen] = _pallas_forward.causal_forward(
        *(chunk(x) for x in (q, k, v, fq, fk)), degree=4, block_size=block, local_exact=True,
        bias=1.0, tiles=tiles, interpret=True, initial_state=state_at(256),
        state_block=jnp.array([1, 3]))
  # bf16: phi_k is rounded to bf16 (2^-9) before it meets V, in S and (v6e) z.
  tol = F32_RTOL if dtype == jnp.float32 else BF16_RTOL
  state_tol = F32_RTOL if dtype == jnp.float32 else 2.0**-8
  for gen, (o, den, state) in results.items():
    assert _rel_err(o, want) < tol, (gen, _rel_err(o, want))
    # Row 0: the state at the start of the chunk's block 1; row 1: after its last block.
    for row, end in ((0, 512), (1, 1024)):
      s_want = state_at(end)[row]
      assert _rel_err(state[row, :, :h], s_want[:, :h]) < state_tol, (gen, row)
      assert _rel_err(state[row, :, h], s_want[:, h]) < state_tol, (gen, row)
      np.testing.assert_array_equal(state[row, :, h + 1:], 0.0)
  # The two tilings agree on every output, the normaliser's den included.
  for a, c in zip(results["v5e"], results["v6e"]):
    assert _rel_err(a, c) < tol, _rel_err(a, c)
