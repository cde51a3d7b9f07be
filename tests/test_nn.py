"""Flax layers: shapes, dtypes, GQA, sketches under training, equality with the op."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pallas_polysketch as ps
from pallas_polysketch import ref
from pallas_polysketch.nn import (
    PolySketchAttention,
    PolySketchAttentionLinen,
    SketchVariable,
    rotary_embedding,
)

D, N, T, B = 32, 4, 24, 2  # in_features, heads, seq (not a block multiple), batch


def _x(dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D), dtype)


def _layer(**kw):
  kw.setdefault("block_size", 8)
  return PolySketchAttention(D, N, rngs=nnx.Rngs(kw.pop("seed", 0)), **kw)


OPTIONS = [
    dict(attention="polysketch", sketch="learned"),
    dict(attention="polysketch", sketch="random"),
    dict(attention="polysketch", sketch="learned", local_exact=False),
    dict(attention="polysketch", sketch="random", causal=False),
    dict(attention="polysketch", sketch="random", degree=8, sketch_dim=16),
    dict(attention="polysketch", sketch="learned", rope=False, head_dim=12),
    dict(attention="polynomial"),
    dict(attention="polynomial", degree=2, causal=False),
    dict(attention="softmax"),
    dict(attention="softmax", causal=False, rope=False),
    dict(attention="polysketch", sketch="random", sketch_type="hadamard"),
    dict(attention="polysketch", sketch="random", sketch_type="hadamard", degree=8,
         sketch_dim=16, sketch_scaling="official"),
]


@pytest.mark.parametrize("i", range(len(OPTIONS)),
                         ids=["-".join(f"{k}={v}" for k, v in o.items()) for o in OPTIONS])
def test_shapes_and_dtype_float32(i):
  # every other option set also runs grouped-query attention (2 kv heads)
  layer = _layer(num_kv_heads=2 if i % 2 else None, **OPTIONS[i])
  y = layer(_x())
  assert y.shape == (B, T, D) and y.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("attention,sketch", [("polysketch", "learned"), ("polysketch", "random"),
                                              ("polynomial", "learned"), ("softmax", "learned")])
def test_bfloat16_compute(attention, sketch):
  layer = _layer(attention=attention, sketch=sketch, dtype=jnp.bfloat16)
  y = layer(_x(jnp.bfloat16))
  assert y.shape == (B, T, D) and y.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  # param_dtype stays float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))


def test_param_dtype():
  layer = _layer(param_dtype=jnp.bfloat16)
  assert {p.dtype for p in jax.tree.leaves(nnx.state(layer, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("attention,sketch", [("polysketch", "learned"), ("polysketch", "random"),
                                              ("polynomial", "learned"), ("softmax", "learned")])
def test_gqa_equals_full_heads_with_repeated_kv(attention, sketch):
  gqa = _layer(attention=attention, sketch=sketch, num_kv_heads=2)
  full = _layer(attention=attention, sketch=sketch, seed=1)
  assert gqa.key.kernel.shape == (D, 2 * (D // N))
  hd = D // N

  def tile(kernel):  # [D, 2*hd] -> [D, 4*hd], each kv head repeated for its 2 q heads
    return jnp.repeat(kernel.reshape(D, 2, hd), 2, axis=1).reshape(D, N * hd)

  state = nnx.state(gqa)
  pure = nnx.to_pure_dict(state)
  pure["key"]["kernel"] = tile(pure["key"]["kernel"])
  pure["value"]["kernel"] = tile(pure["value"]["kernel"])
  full_state = nnx.state(full)
  nnx.replace_by_pure_dict(full_state, pure)
  nnx.update(full, full_state)
  x = _x()
  np.testing.assert_allclose(gqa(x), full(x), rtol=1e-5, atol=1e-5)
  # and the kv heads really are shared: a model with untied copies differs
  pure["key"]["kernel"] = pure["key"]["kernel"].at[:, :hd].add(1.0)
  nnx.replace_by_pure_dict(full_state, pure)
  nnx.update(full, full_state)
  assert not np.allclose(gqa(x), full(x), atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="flash"), "attention must be one of"),
    (dict(sketch="gaussian"), "sketch must be one of"),
    (dict(num_kv_heads=3), "must divide num_heads"),
    (dict(degree=3), "positive even"),
    (dict(degree=6, sketch="random"), "power of two"),
    (dict(block_size=12), "multiple of 8"),
    (dict(head_dim=7), "even head_dim"),
    (dict(sketch_dim=0), "sketch_dim"),
    (dict(implementation="cuda"), "implementation must be one of"),
    (dict(sketch_type="srht"), r"sketch_type must be one of \('gaussian', 'hadamard'\), got 'srht'"),
    (dict(sketch_type="srht", attention="softmax"), "sketch_type must be one of"),
    (dict(sketch_scaling="paper"),
     r"sketch_scaling must be one of \('unbiased', 'official'\), got 'paper'"),
    (dict(sketch="random", sketch_type="hadamard", head_dim=12),
     "needs a head_dim that is a power of two.*got head_dim=12"),
    (dict(sketch="random", sketch_type="hadamard", degree=8, sketch_dim=12),
     "needs a sketch_dim that is a power of two.*got sketch_dim=12 with degree=8"),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _layer(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(param_dtype=jnp.int8), dict(dtype=jnp.int32),
                                    dict(dtype=jnp.complex64), dict(dtype="float33")])
def test_non_float_dtypes_raise_at_construction_naming_the_field(kwargs):
  """param_dtype=int8 failed in an initialiser ("dtype argument to `uniform`"),
  dtype=int32 at the first call ("Dtype must be inexact"), complex64 naming x."""
  (name, value), = kwargs.items()
  with pytest.raises(TypeError, match=rf"^{name} must be a floating dtype .*got {value!r}"):
    _layer(**kwargs)


def test_bad_in_features_and_input():
  with pytest.raises(ValueError, match="divisible by num_heads"):
    PolySketchAttention(30, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[batch, seq, 32\]"):
    _layer()(jnp.ones((2, 5, 16)))
  with pytest.raises(ValueError, match=r"q has an empty axis: shape \(2, 0, 4, 8\)"):
    _layer()(jnp.ones((2, 0, 32)))


def test_random_sketch_fixed_and_learned_sketch_trains():
  x = _x()

  def loss(model):
    return jnp.mean(model(x) ** 2)

  for sketch in ("random", "learned"):
    model = _layer(sketch=sketch)
    before = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model)))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)
    after = nnx.to_pure_dict(nnx.state(model))
    changed = lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b))
    sketch_changed = jax.tree.leaves(jax.tree.map(changed, before["sketch"], after["sketch"]))
    if sketch == "random":
      assert isinstance(jax.tree.leaves(model.sketch, is_leaf=lambda v: isinstance(v, nnx.Variable))[0],
                        SketchVariable)
      assert not nnx.state(model, nnx.Param).get("sketch")
      assert not any(sketch_changed)
    else:
      assert all(sketch_changed), "every learned-sketch param should move in one Adam step"
    assert changed(before["query"]["kernel"], after["query"]["kernel"])


@pytest.mark.parametrize("sketch", ["learned", "random", "none"])
def test_features_check_x(sketch):
  """An integer x cast the random sketch's matrices to integers (garbage integer
  features); sketch="none" returned zeros for any last dim."""
  layer = _layer(sketch=sketch)
  with pytest.raises(TypeError, match=r"x must have a floating dtype, got int32"):
    layer.features(jnp.ones((5, D // N), jnp.int32))
  with pytest.raises(ValueError, match=rf"x must be \[..., head_dim\] = \[..., {D // N}\], "
                                       r"got shape \(5, 6\)"):
    layer.features(jnp.ones((5, 6)))
  assert layer.features(jnp.ones((5, D // N))).shape == (5, layer.sketch_dim)


def test_random_sketch_differs_per_layer_seed():
  a, b = _layer(sketch="random", seed=0), _layer(sketch="random", seed=1)
  assert not np.allclose(a.sketch["g1"][...], b.sketch["g1"][...])


def test_sketch_type_and_scaling_options():
  """hadamard and gaussian layers run and differ; "official" changes the output."""
  x = _x()
  gauss = _layer(sketch="random")
  had = _layer(sketch="random", sketch_type="hadamard")
  assert (gauss.sketch_type, gauss.sketch_scaling) == ("gaussian", "unbiased")
  assert set(had.sketch) == {"signs1", "cols1", "signs2", "cols2", "left", "right"}
  assert all(isinstance(v, SketchVariable) for v in jax.tree.leaves(
      had.sketch, is_leaf=lambda v: isinstance(v, nnx.Variable)))
  y_gauss, y_had = gauss(x), had(x)
  assert y_had.shape == y_gauss.shape == (B, T, D)
  assert bool(jnp.all(jnp.isfinite(y_had)))
  assert not np.allclose(y_gauss, y_had, atol=1e-4)
  # Same weights, official scaling: features r^-1/2 times the unbiased ones
  # (degree 4), so the sketched weights shrink by 1/r^2 and the output moves.
  off = _layer(sketch="random", sketch_type="hadamard", sketch_scaling="official")
  nnx.update(off, nnx.state(had))
  q = jax.random.normal(jax.random.key(3), (B, T, N, D // N))
  np.testing.assert_allclose(off.features(q), had.features(q) / math.sqrt(32), rtol=1e-5, atol=1e-6)
  assert not np.allclose(off(x), y_had, atol=1e-4)
  # bf16 compute: signs follow x's dtype, the column indices stay int32
  bf = _layer(sketch="random", sketch_type="hadamard", dtype=jnp.bfloat16)
  assert bf.sketch["cols1"][...].dtype == jnp.int32
  f = bf.features(q.astype(jnp.bfloat16))
  assert f.dtype == jnp.bfloat16 and f.shape == (B, T, N, 32)
  y = bf(x.astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
  # the random sketch stays fixed under an optimizer on nnx.Param
  assert not nnx.state(had, nnx.Param).get("sketch")


def _manual(layer, x):
  """The layer by hand: projections, rotary, shared LayerNorm, features, the op."""
  hd, n, kv = layer.head_dim, layer.num_heads, layer.num_kv_heads
  b, t, _ = x.shape
  q = (x @ layer.query.kernel[...]).reshape(b, t, n, hd)
  k = (x @ layer.key.kernel[...]).reshape(b, t, kv, hd)
  v = (x @ layer.value.kernel[...]).reshape(b, t, kv, hd)
  k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
  q, k = rotary_embedding(q), rotary_embedding(k)
  if layer.attention == "softmax":
    s = jnp.einsum("bind,bjnd->bnij", q, k) / math.sqrt(hd)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    o = jnp.einsum("bnij,bjnd->bind", jax.nn.softmax(s, axis=-1), v)
  else:
    scale, bias = layer.qk_norm.scale[...], layer.qk_norm.bias[...]

    def ln(z):
      mu = z.mean(-1, keepdims=True)
      var = ((z - mu) ** 2).mean(-1, keepdims=True)
      return (z - mu) / jnp.sqrt(var + 1e-5) * scale + bias

    q, k = ln(q), ln(k)
    if layer.attention == "polynomial":
      o = ref.polynomial_attention(q, k, v, degree=layer.degree)
    else:
      params = jax.tree.map(lambda a: a[...], layer.sketch,
                            is_leaf=lambda a: isinstance(a, nnx.Variable))
      feat = (ps.learned_sketch_features if layer.sketch_kind == "learned"
              else functools.partial(ps.random_sketch_features,
                                     scaling=layer.sketch_scaling))
      o = ref.polysketch_attention_quadratic(
          q, k, v, feat(params, q), feat(params, k), degree=layer.degree,
          block_size=layer.block_size, local_exact=layer.local_exact)
  return o.reshape(b, t, n * hd) @ layer.out.kernel[...]


@pytest.mark.parametrize("opts", [
    dict(attention="polysketch", sketch="learned"),
    dict(attention="polysketch", sketch="learned", num_kv_heads=2),
    dict(attention="polysketch", sketch="random", num_kv_heads=2),
    dict(attention="polysketch", sketch="random", sketch_type="hadamard",
         sketch_scaling="official"),
    dict(attention="polysketch", sketch="random", sketch_type="hadamard", degree=8,
         sketch_dim=8),
    dict(attention="polysketch", sketch="learned", local_exact=False),
    dict(attention="polynomial"),
    dict(attention="softmax"),
], ids=str)
def test_layer_equals_op_by_hand(opts):
  layer = _layer(**opts)
  # non-trivial LayerNorm params, so a wrong placement or a missing share shows
  layer.qk_norm and layer.qk_norm.scale.set_value(
      1.0 + 0.3 * jax.random.normal(jax.random.key(5), (layer.head_dim,)))
  layer.qk_norm and layer.qk_norm.bias.set_value(
      0.1 * jax.random.normal(jax.random.key(6), (layer.head_dim,)))
  x = _x() * 0.5
  got = layer(x)
  want = _manual(layer, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_rotary_is_relative():
  x = jax.random.normal(jax.random.key(0), (1, 16, 1, 8))
  q = jnp.broadcast_to(x[:, :1], x.shape)
  k = jnp.broadcast_to(x[:, 1:2], x.shape)
  rq, rk = rotary_embedding(q), rotary_embedding(k)
  np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  dots = jnp.einsum("btnh,btnh->t", rq[:, 3:], rk[:, :-3])  # offset 3 at every position
  np.testing.assert_allclose(dots, jnp.full_like(dots, dots[0]), rtol=1e-4, atol=1e-5)
  assert not np.allclose(rq[0, 0], rq[0, 5])


def test_rotary_embedding_errors():
  """An offset of another batch broadcast x to that batch (a [3] offset on a batch
  of 1 gave 3 rows); other mismatches failed inside JAX."""
  x = jnp.ones((1, 16, 2, 8))
  with pytest.raises(ValueError, match=r"offset must be an int or \[batch\] = \(1,\).*got shape \(3,\)"):
    rotary_embedding(x, offset=jnp.arange(3))
  with pytest.raises(ValueError, match=r"positions must be \[batch, seq\] = \(1, 16\).*got shape \(16,\)"):
    rotary_embedding(x, positions=jnp.arange(16))
  with pytest.raises(ValueError, match=r"positions must be .*got shape \(1, 15\)"):
    rotary_embedding(x, positions=jnp.zeros((1, 15), jnp.int32))
  with pytest.raises(ValueError, match="even head_dim"):
    rotary_embedding(x[..., :7])
  with pytest.raises(ValueError, match=r"x must have rank 4"):
    rotary_embedding(x[:, :, 0])
  two = jnp.ones((2, 16, 2, 8))
  assert rotary_embedding(two, offset=jnp.array([0, 5])).shape == two.shape
  assert rotary_embedding(two, positions=jnp.arange(16)[None]).shape == two.shape


@pytest.mark.parametrize("base", [0.0, -1.0, float("nan")])
def test_rotary_embedding_base_must_be_positive(base):
  """base 0, negative or NaN gave NaN angles and a NaN output without an error."""
  with pytest.raises(ValueError, match=f"base must be a positive finite number, got {base}"):
    rotary_embedding(jnp.ones((1, 4, 2, 8)), base=base)


@pytest.mark.parametrize("sketch,extra", [
    ("random", {}), ("learned", {}),
    ("random", dict(sketch_type="hadamard", sketch_scaling="official")),
    ("learned", dict(sketch_hidden_dim=12)),
], ids=str)
def test_linen_matches_nnx(sketch, extra):
  kw = dict(attention="polysketch", sketch=sketch, num_kv_heads=2, block_size=8, **extra)
  lin = PolySketchAttentionLinen(in_features=D, num_heads=N, **kw)
  x = _x()
  variables = lin.init(jax.random.key(0), x)
  y = lin.apply(variables, x)
  assert y.shape == (B, T, D) and y.dtype == jnp.float32
  if sketch == "random":
    assert "sketch" in variables and "sketch" not in variables["params"]["attention"]
  else:
    hidden = variables["params"]["attention"]["sketch"]["branch2"][1]["w_in"].shape[-1]
    assert hidden == extra.get("sketch_hidden_dim", 8 * 32)
  layer = PolySketchAttention(D, N, rngs=nnx.Rngs(123), **kw)
  pure = dict(variables["params"]["attention"])
  pure.update(variables.get("sketch", {}).get("attention", {}))
  state = nnx.state(layer)
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: getattr(a, "value", a), pure))
  nnx.update(layer, state)
  np.testing.assert_allclose(y, layer(x), rtol=1e-6, atol=1e-6)



def test_linen_refuses_variables_of_another_config():
  """nnx.bridge loads variables without a check: another config's failed inside
  JAX ("cannot reshape") or ran silently (a softmax layer's variables on a
  polysketch layer kept a fresh random sketch; another sketch_dim's sketch was
  used as given)."""
  layer = lambda **kw: PolySketchAttentionLinen(
      **{**dict(in_features=D, num_heads=N, sketch_dim=4, block_size=8), **kw})
  x = _x()
  variables = layer().init(jax.random.key(0), x)
  assert layer().apply(variables, x).shape == (B, T, D)
  with pytest.raises(ValueError, match=r"attention/key/kernel has shape \(32, 32\) in the "
                                       r"variables, this config builds \(32, 8\)"):
    layer(num_kv_heads=1).apply(variables, x)
  with pytest.raises(ValueError, match=r"attention/sketch/branch1/0/w_in has shape"):
    layer(sketch_dim=8).apply(variables, x)
  softmax = layer(attention="softmax").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"the variables lack \['qk_norm/bias'"):
    layer().apply(softmax, x)

# --- packed segments (issue 12) --------------------------------------------------

SEGMENTS = [(0, 0, 7), (0, 7, 8), (0, 8, 24), (1, 0, 13), (1, 13, 24)]  # (row, start, end)


def _segment_ids():
  ids = np.zeros((B, T), np.int32)
  for n, (b, s, e) in enumerate(SEGMENTS):
    ids[b, s:e] = n % 2          # repeated ids: a run is a segment, not an id
  return jnp.asarray(ids)


@pytest.mark.parametrize("opts", [
    dict(attention="polysketch", sketch="random", num_kv_heads=2),
    dict(attention="polysketch", sketch="learned", causal=False),
    dict(attention="polynomial"),
    dict(attention="softmax", num_kv_heads=2),
    dict(attention="softmax", causal=False),
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_packed_segments_equal_each_segment_alone(opts):
  """Attention stays inside each segment and rotary positions restart at its
  start: every segment's output is the layer run on it alone."""
  layer, x = _layer(**opts), _x()
  call = nnx.jit(lambda m, x, ids: m(x, segment_ids=ids))
  packed = call(layer, x, _segment_ids())
  for b, s, e in SEGMENTS:
    alone = call(layer, x[b:b + 1, s:e], None)
    np.testing.assert_allclose(packed[b:b + 1, s:e], alone, rtol=2e-5, atol=2e-6,
                               err_msg=str((b, s, e)))


def test_segment_ids_errors():
  layer = _layer()
  with pytest.raises(ValueError, match=r"segment_ids must be \[batch, seq\] = \(2, 24\).*got shape \(2, 23\)"):
    layer(_x(), segment_ids=jnp.zeros((B, T - 1), jnp.int32))
  with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
    layer(_x(), segment_ids=jnp.zeros((B, T), jnp.float32))
  layer.init_cache((B, 1, D))
  with pytest.raises(ValueError, match="segment_ids is not supported with decode=True"):
    layer(_x()[:, :1], segment_ids=jnp.zeros((B, 1), jnp.int32), decode=True)


def test_decode_errors():
  """key_mask with decode=True was ignored (padding keys went into the cache and were
  attended to); a batch other than the cache's failed inside the rotary embedding."""
  layer = _layer()
  layer.init_cache((B, 1, D))
  with pytest.raises(ValueError, match="key_mask is not supported with decode=True"):
    layer(_x()[:, :4], key_mask=jnp.array([[True, True, False, False]] * B), decode=True)
  with pytest.raises(ValueError, match=r"x has batch 1 .* the cache was made for batch 2"):
    layer(_x()[:1, :1], decode=True)


@pytest.mark.parametrize("arg", ["rope", "decode"])
def test_layer_flags_must_be_bools(arg):
  """A truthy string such as "no" switched rotary embeddings or decoding on."""
  with pytest.raises(TypeError, match=f"{arg} must be a bool, got 'no'"):
    if arg == "rope":
      _layer(rope="no")
    else:
      _layer()(_x(), decode="no")


def test_sketch_none_is_exact_local_blocks_alone():
  """sketch="none": no sketched prefix, so a block's output is the layer on that
  block alone (without rotary positions), and it differs from the random
  sketch, whose prefix reaches back."""
  x = _x()
  layer = _layer(sketch="none", rope=False)
  out = layer(x)
  for s in (0, 8, 16):
    np.testing.assert_allclose(out[:, s:s + 8], layer(x[:, s:s + 8]), rtol=2e-5, atol=2e-6)
  sketched = _layer(sketch="random", rope=False)
  assert float(jnp.max(jnp.abs(sketched(x)[:, 8:16] - sketched(x[:, 8:16])))) > 1e-3
  with pytest.raises(ValueError, match="sketch='none' .* needs local_exact=True"):
    _layer(sketch="none", local_exact=False)
  # non-causal attention has no exact local blocks: the layer's attention was all zeros
  with pytest.raises(ValueError, match="sketch='none' .* needs local_exact=True and "
                                       "causal=True.*got local_exact=True, causal=False"):
    _layer(sketch="none", causal=False)


def test_key_mask_must_be_bool_or_int():
  """A float key_mask was cast to bool: an additive one (0 keep, -inf drop)
  masked the real tokens and kept the padding, without an error; a list failed
  with "'list' object has no attribute 'shape'"."""
  layer = _layer()
  keep = _padding_key_mask()
  with pytest.raises(TypeError, match="key_mask must be bool .* got dtype float32"):
    layer(_x(), key_mask=jnp.where(keep, 0.0, -jnp.inf))
  want = layer(_x(), key_mask=keep)
  np.testing.assert_array_equal(layer(_x(), key_mask=keep.astype(jnp.int32)), want)
  np.testing.assert_array_equal(layer(_x(), key_mask=np.asarray(keep).tolist()), want)


def _padding_key_mask():
  return jnp.arange(T)[None, :] < jnp.array([[T], [T - 5]])


def _three_run_segment_ids():
  return jnp.repeat(jnp.array([[0, 0, 1], [0, 1, 1]]), T // 3, axis=1)


@pytest.mark.parametrize("opts, call", [
    (dict(sketch="learned"), {}),
    (dict(sketch="random", num_kv_heads=2, local_exact=False), {}),
    (dict(sketch="learned", causal=False), dict(key_mask=_padding_key_mask)),
    (dict(sketch="none"), dict(segment_ids=_three_run_segment_ids)),
], ids=["learned", "random-gqa-no-local", "non-causal-key-mask", "no-sketch-segments"])
def test_exact_polynomial_is_the_polynomial_layer_with_the_same_params(opts, call):
  """exact_polynomial=True computes what attention="polynomial" does with the
  layer's own q, k, v, out and q/k LayerNorm (the training warm-up)."""
  call = {name: make() for name, make in call.items()}
  sketched = _layer(attention="polysketch", **opts)
  exact = _layer(attention="polynomial", num_kv_heads=opts.get("num_kv_heads"),
                 causal=opts.get("causal", True))
  sketched.qk_norm.scale.set_value(1.0 + 0.3 * jax.random.normal(jax.random.key(5), (D // N,)))
  for i, name in enumerate(("query", "key", "value", "out")):   # the same weights in both
    w = jax.random.normal(jax.random.key(10 + i), getattr(sketched, name).kernel.shape)
    getattr(sketched, name).kernel.set_value(w / math.sqrt(w.shape[0]))
    getattr(exact, name).kernel.set_value(w / math.sqrt(w.shape[0]))
  exact.qk_norm.scale.set_value(sketched.qk_norm.scale[...])
  x = _x()
  got = sketched(x, exact_polynomial=True, **call)
  np.testing.assert_array_equal(got, exact(x, **call))
  # the sketched output is another function: the flag has teeth
  assert not np.allclose(got, sketched(x, **call), rtol=1e-3, atol=1e-4)
  # and the gradient reaches q, k, v but not the sketch
  grads = nnx.grad(lambda m: jnp.sum(m(x, exact_polynomial=True, **call) ** 2))(sketched)
  assert np.any(grads.query.kernel[...] != 0)
  if opts["sketch"] == "learned":
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads.sketch))


def test_exact_polynomial_needs_polysketch_and_no_decode():
  x = _x()
  for attention in ("polynomial", "softmax"):
    with pytest.raises(ValueError, match="exact_polynomial=True needs attention='polysketch'"):
      _layer(attention=attention)(x, exact_polynomial=True)
  layer = _layer(attention="polysketch")
  with pytest.raises(TypeError, match="exact_polynomial must be a bool, got 'False'"):
    layer(x, exact_polynomial="False")
  layer.init_cache(x.shape)
  with pytest.raises(ValueError, match="decode=True"):
    layer(x, decode=True, exact_polynomial=True)
