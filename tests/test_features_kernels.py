"""The learned sketch's Pallas feature kernels (`pallas_polysketch/_pallas_features.py`):
interpret mode against the pure-JAX path, the same configurations lowered for
TPU and compiled with libtpu, and their errors.

Inputs at the layer's magnitudes: q, k LayerNorm'd per head (the layer's q/k
norm), sketch parameters moved off their initial values so every LayerNorm
affine and both branches matter.
"""
import functools
import os
import re

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_polysketch as ps
from pallas_polysketch.tpu_config import (GENERATIONS, TileConfig, feature_vmem_estimate,
                                          resolve_feature_tiles)
from helpers import EPS32, TOPOLOGIES, layer_norm, rel_err, topology_sharding

H, R = 64, 32
# (B, T, N, features_tile): T = 300 pads to 3 grid steps of 128 tokens; the
# production tiling (1024) at a length that pads its one step.
INTERPRET_CASES = [(2, 300, 2, 128), (1, 1100, 1, None)]


def _params(hidden_dim=None, head_dim=H, sketch_dim=R):
  params = ps.learned_sketch_init(jax.random.key(0), head_dim, sketch_dim=sketch_dim,
                                  hidden_dim=hidden_dim)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _inputs(b, t, n, dtype, head_dim=H, sketch_dim=R):
  x = layer_norm(jax.random.normal(jax.random.key(2), (b, t, n, head_dim)))
  cot = jax.random.normal(jax.random.key(3), (b, t, n, sketch_dim))
  return x.astype(dtype), cot.astype(dtype)


def _value_and_grads(params, x, cot, **kw):
  fn = lambda p, x: ps.learned_sketch_features(p, x, **kw)
  f, vjp = jax.vjp(fn, params, x)
  return f, vjp(cot)


def _kernel(tile=None, bf16_gelu=None):
  return dict(implementation="pallas", interpret=True,
              tile_config=TileConfig(features_tile=tile, bf16_gelu=bf16_gelu))


@pytest.mark.parametrize("b,t,n,tile", INTERPRET_CASES)
def test_float32_kernels_match_the_xla_path(b, t, n, tile):
  """Features, x's cotangent and every parameter's gradient, float32: the
  kernels fold the biases into the matmuls and sum the weight gradients per
  head and tile, so they agree to float32 rounding of sums over the hidden
  width (256) and the tokens, not bit for bit."""
  params = _params()
  x, cot = _inputs(b, t, n, jnp.float32)
  f_want, g_want = _value_and_grads(params, x, cot, implementation="xla")
  f_got, g_got = _value_and_grads(params, x, cot, **_kernel(tile))
  assert f_got.shape == (b, t, n, R) and f_got.dtype == jnp.float32
  tol = 8 * 8 * R * EPS32    # sums of 8r products, then a few more float32 steps
  assert rel_err(f_got, f_want) < tol
  for got, want in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
    assert got.shape == want.shape
    assert rel_err(got, want) < 4 * tol, (got.shape, rel_err(got, want))


@pytest.mark.parametrize("bf16_gelu", [False, True])
def test_bfloat16_kernels_are_no_less_accurate_than_the_xla_path(bf16_gelu):
  """bf16 inputs: against the float32 function, the kernels' error (float32
  or bf16 GELU) is within twice the pure-JAX bf16 path's, for the features
  and every gradient: no accuracy lost beyond the dtype's."""
  b, t, n, tile = INTERPRET_CASES[0]
  params = _params()
  x, cot = _inputs(b, t, n, jnp.bfloat16)
  exact = _value_and_grads(params, x.astype(jnp.float32), cot.astype(jnp.float32),
                           implementation="xla")
  xla = _value_and_grads(params, x, cot, implementation="xla")
  got = _value_and_grads(params, x, cot, **_kernel(tile, bf16_gelu))
  assert got[0].dtype == jnp.bfloat16
  floor = float(jnp.finfo(jnp.bfloat16).eps)
  for e, a, g in zip(*(jax.tree_util.tree_leaves(v) for v in (exact, xla, got))):
    assert rel_err(g, e) <= 2 * rel_err(a, e) + floor / 8, (e.shape, rel_err(g, e), rel_err(a, e))


@pytest.mark.parametrize("t,n,hidden_dim", [(130, 1, None), (200, 2, 2 * R)])
def test_padding_and_a_narrow_hidden_width(t, n, hidden_dim):
  """T = 130 pads to 256 with zero tokens: the weights' gradients equal those
  of the real tokens alone (their sum over a broken, nonzero padding would
  differ); hidden_dim = 2r (the cheaper sketch option) through the kernels."""
  params = _params(hidden_dim)
  x, cot = _inputs(1, t, n, jnp.float32)
  want = _value_and_grads(params, x, cot, implementation="xla")
  got = _value_and_grads(params, x, cot, **_kernel(128))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert rel_err(a, b) < 1e-4


# (head_dim, sketch_dim, generation): a ones row below H = 128 (or r = 128)
# inputs would take an MXU pass of its own on 128-wide MXUs, so the VPU adds
# that layer's bias; on v6e's 256-wide MXU the ones row fits the pass.
WIDE_HEAD_CASES = [(128, 64, "v5e"), (128, 128, "v5e"), (128, 64, "v6e")]


@pytest.mark.parametrize("head_dim,sketch_dim,generation", WIDE_HEAD_CASES)
def test_wide_heads_add_the_biases_on_the_vpu_where_a_ones_row_costs_a_pass(
    head_dim, sketch_dim, generation):
  """Float32 against the xla path, as above (hidden 2r, the sums 2r long), for
  the features and every gradient; and the TPU lowering takes each input
  layer's kernel with its bias column (H + 16 wide) only where the ones row
  fits the MXU pass."""
  hidden = 2 * sketch_dim
  params = _params(hidden, head_dim, sketch_dim)
  x, cot = _inputs(1, 200, 2, jnp.float32, head_dim, sketch_dim)
  config = TileConfig(generation=generation, features_tile=128)
  want = _value_and_grads(params, x, cot, implementation="xla")
  got = _value_and_grads(params, x, cot, implementation="pallas", interpret=True,
                         tile_config=config)
  tol = 8 * hidden * EPS32
  for i, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want))):
    assert a.shape == b.shape
    assert rel_err(a, b) < (tol if i == 0 else 4 * tol), (b.shape, rel_err(a, b))
  text = _exported_text("tpu", (1, 256, 2, head_dim), params=params, tile_config=config)
  mxu = GENERATIONS[generation].mxu_width
  for rows in (head_dim, sketch_dim):
    with_bias_column = f"tensor<2x{hidden}x{rows + 16}xbf16>" in text
    assert with_bias_column == (rows % mxu != 0), (rows, generation)


def test_generation_defaults():
  """1024 tokens a step (512 on v4, whose VMEM is 16 MiB; float32 halves it
  again there), capped at the length rounded up to 128; bf16 GELU where the
  VPU has bf16; a VMEM limit over the compiler's default where the estimate
  needs it, within the generation's VMEM; an explicit tile that cannot fit
  says so."""
  dims = dict(hidden_dim=8 * R, head_dim=H, sketch_dim=R)
  for name, gen in GENERATIONS.items():
    for dtype in (jnp.bfloat16, jnp.float32):
      tiles = resolve_feature_tiles(TileConfig(generation=name), 4096, dtype, **dims)
      want = {"v4": 512 if dtype == jnp.bfloat16 else 256}.get(name, 1024)
      assert tiles.tile == want, (name, dtype)
      estimate = feature_vmem_estimate(tiles.tile, dtype, **dims)
      assert estimate <= (tiles.vmem_limit_bytes or gen.default_scoped_vmem_bytes)
      assert tiles.vmem_limit_bytes is None or tiles.vmem_limit_bytes <= gen.vmem_bytes
    assert resolve_feature_tiles(TileConfig(generation=name), 64, jnp.bfloat16,
                                 **dims).bf16_gelu == gen.bf16_vpu
  v5e = lambda **kw: TileConfig(generation="v5e", **kw)
  assert resolve_feature_tiles(v5e(), 300, jnp.bfloat16, **dims).tile == 384
  assert resolve_feature_tiles(v5e(features_tile=256), 4096, jnp.bfloat16, **dims).tile == 256
  assert not resolve_feature_tiles(TileConfig(generation="v6e", bf16_gelu=False), 64,
                                   jnp.bfloat16, **dims).bf16_gelu
  with pytest.raises(ValueError, match=r"features_tile=2048.*v4's 16 MiB"):
    resolve_feature_tiles(TileConfig(generation="v4", features_tile=2048), 4096,
                          jnp.float32, **dims)


# ----------------------------------------------------------------------------
# Which path runs, and errors.
# ----------------------------------------------------------------------------

def _exported_text(platform, x_shape, dtype=jnp.bfloat16, params=None, **kw):
  params = _params() if params is None else params
  fn = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(
      ps.learned_sketch_features(p, x, **kw).astype(jnp.float32)), (0, 1)))
  return jax.export.export(fn, platforms=[platform])(
      params, jax.ShapeDtypeStruct(x_shape, dtype)).mlir_module()


def test_default_runs_the_kernels_on_tpu_and_xla_elsewhere():
  """None: both kernels (forward, VJP) when lowered for TPU, none for CPU;
  "xla" none on TPU; an x the kernels cannot take (3-D) falls through to
  the xla path on TPU."""
  tpu = _exported_text("tpu", (1, 256, 4, H))
  assert set(re.findall(r"polysketch_learned_features\w*", tpu)) == {
      "polysketch_learned_features", "polysketch_learned_features_vjp"}
  assert "tpu_custom_call" not in _exported_text("cpu", (1, 256, 4, H))
  assert "tpu_custom_call" not in _exported_text("tpu", (1, 256, 4, H), implementation="xla")
  assert "tpu_custom_call" not in _exported_text("tpu", (256, 4, H))


def test_pallas_without_interpret_names_the_function_off_tpu():
  x = jnp.zeros((1, 128, 1, H))
  with pytest.raises(ValueError, match=r"learned_sketch_features\(implementation='pallas'\).*"
                                       r"cpu.*interpret=True"):
    jax.jit(functools.partial(ps.learned_sketch_features, implementation="pallas"))(_params(), x)
  # Called eagerly too: jax's "Only interpret mode is supported on CPU
  # backend." named neither the function nor the way out.
  with pytest.raises(ValueError, match=r"learned_sketch_features\(implementation='pallas'\).*"
                                       r"cpu.*interpret=True"):
    ps.learned_sketch_features(_params(), x, implementation="pallas")
  with jax.disable_jit(), pytest.raises(ValueError, match=r"learned_sketch_features.*cpu"):
    ps.learned_sketch_features(_params(), x, implementation="pallas")


@pytest.mark.parametrize("shape,dtype,match", [
    ((128, 1, H), jnp.float32, r"\[B, T, N, head_dim\].*\(128, 1, 64\)"),
    ((1, 128, 1, H), jnp.float16, r"bfloat16 or float32.*float16"),
    ((1, 0, 1, H), jnp.float32, r"empty.*\(1, 0, 1, 64\)"),
])
def test_pallas_rejects_inputs_the_kernels_cannot_take(shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    ps.learned_sketch_features(_params(), jnp.zeros(shape, dtype), implementation="pallas",
                               interpret=True)


def test_kernels_refuse_a_shard_map_that_checks_varying_axes():
  """Inside jax.shard_map with its default check_vma=True (the docstring says to
  call it inside shard_map under sharding), the kernels failed in jax with
  "`manual_axis_type` on `jax.ShapeDtypeStruct` must not be `None`"; they now
  say to build it with check_vma=False, and the default path runs there."""
  from jax.sharding import Mesh, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
  x, _ = _inputs(2, 128, 1, jnp.float32)
  params = _params()
  run = lambda **kw: jax.shard_map(
      lambda x: ps.learned_sketch_features(params, x, **kw), mesh=mesh,
      in_specs=P("batch"), out_specs=P("batch"))(x)
  with pytest.raises(ValueError, match=r"learned_sketch_features\(implementation='pallas'\): "
                                       r"x varies over mesh axes \('batch',\).*check_vma=False"):
    run(implementation="pallas", interpret=True)
  want = ps.learned_sketch_features(params, x, implementation="xla")
  assert rel_err(run(), want) < 4 * EPS32 * H


def test_bad_arguments_are_named():
  x = jnp.zeros((1, 128, 1, H))
  with pytest.raises(ValueError, match=r"implementation must be one of.*'triton'"):
    ps.learned_sketch_features(_params(), x, implementation="triton")
  # a TypeError, as polysketch_attention raises for it (this raised a ValueError)
  for bad in ({"features_tile": 128}, "v5e"):
    with pytest.raises(TypeError, match=rf"tile_config must be a TileConfig.*{type(bad).__name__}"):
      ps.learned_sketch_features(_params(), x, tile_config=bad)
    with pytest.raises(TypeError, match=rf"tile_config must be a TileConfig.*{type(bad).__name__}"):
      ps.polysketch_attention(x, x, x, x, x, tile_config=bad)
  with pytest.raises(ValueError, match=r"features_tile must be a positive multiple of 128.*200"):
    TileConfig(features_tile=200)
  with pytest.raises(TypeError, match=r"bf16_gelu must be a bool"):
    TileConfig(bf16_gelu="yes")


# ----------------------------------------------------------------------------
# Lowered for TPU and compiled with libtpu: every interpret configuration above
# and each generation's production tiling.
# ----------------------------------------------------------------------------

def _compile(generation, b, t, n, dtype, tile_config, hidden_dim=None, head_dim=H,
             sketch_dim=R):
  sharding = topology_sharding(generation)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        _params(hidden_dim, head_dim, sketch_dim))
  x = jax.ShapeDtypeStruct((b, t, n, head_dim), dtype, sharding=sharding)
  fn = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(ps.learned_sketch_features(
      p, x, implementation="pallas", tile_config=tile_config).astype(jnp.float32)), (0, 1)))
  lowered = fn.lower(params, x)
  assert "polysketch_learned_features_vjp" in lowered.as_text()
  lowered.compile()


@pytest.mark.tpu_compile
def test_libtpu_compiles_the_interpret_configurations():
  """v5e, each (B, T, N, tile) and dtype / GELU dtype the interpret tests run."""
  for b, t, n, tile in INTERPRET_CASES:
    for dtype, bf16_gelu in ((jnp.float32, None), (jnp.bfloat16, False), (jnp.bfloat16, True)):
      _compile("v5e", b, t, n, dtype,
               TileConfig(generation="v5e", features_tile=tile, bf16_gelu=bf16_gelu))
  _compile("v5e", 1, 130, 1, jnp.float32, TileConfig(generation="v5e", features_tile=128))
  _compile("v5e", 1, 200, 2, jnp.float32, TileConfig(generation="v5e", features_tile=128),
           hidden_dim=2 * R)
  for head_dim, sketch_dim, generation in WIDE_HEAD_CASES:
    _compile(generation, 1, 200, 2, jnp.float32,
             TileConfig(generation=generation, features_tile=128),
             hidden_dim=2 * sketch_dim, head_dim=head_dim, sketch_dim=sketch_dim)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("generation", list(TOPOLOGIES))
def test_libtpu_compiles_each_generations_default_tiling(generation):
  """The default tile (and on v6e bf16 GELU) at 12 heads, bf16: fits the
  generation's VMEM with the limit `resolve_feature_tiles` sets."""
  _compile(generation, 1, 2048, 12, jnp.bfloat16, TileConfig(generation=generation))
  # H = 128, r = 64, hidden 512 (the bias of the first layers on the VPU on
  # 128-wide MXUs)
  _compile(generation, 1, 2048, 12, jnp.bfloat16, TileConfig(generation=generation),
           head_dim=128, sketch_dim=64)


@pytest.mark.parametrize("layer_kw,want", [
    (dict(), None),
    (dict(implementation="xla"), "xla"),
    (dict(implementation="pallas"), None),
    (dict(mesh_axes=(None, None, "seq")), "xla"),
])
def test_layer_runs_the_kernels_unless_pure_jax_or_sharded(monkeypatch, layer_kw, want):
  """The Flax layer's learned features take the kernels' default path (None:
  the kernels on TPU), and the xla path when the layer is pure JAX or given a
  mesh (XLA cannot split a Pallas call over devices)."""
  from flax import nnx
  from jax.sharding import Mesh
  from pallas_polysketch import nn as ps_nn
  if "mesh_axes" in layer_kw:
    layer_kw = dict(layer_kw, mesh=Mesh(np.array(jax.devices()[:1]), ("seq",)))
  seen = []
  real = ps_nn.learned_sketch_features
  monkeypatch.setattr(ps_nn, "learned_sketch_features",
                      lambda p, x, **kw: seen.append(kw.get("implementation")) or real(p, x, **kw))
  layer = ps_nn.PolySketchAttention(64, 2, sketch="learned", sketch_dim=8, rngs=nnx.Rngs(0),
                                    **layer_kw)
  layer.features(jnp.zeros((1, 16, 2, 32)))
  assert seen == [want]
