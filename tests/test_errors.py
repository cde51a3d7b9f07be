"""Bad arguments raise ValueError / TypeError naming the argument and what it got,
before tracing reaches JAX internals."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_polysketch as ps

B, T, N, H, R = 2, 16, 3, 8, 4


def _arrays(dtype=jnp.float32):
  q = jnp.ones((B, T, N, H), dtype)
  f = jnp.ones((B, T, N, R), dtype)
  return q, q, q, f, f


def _shape(*dims):
  return re.escape(str(tuple(dims)))


def attention(q=None, k=None, v=None, fq=None, fk=None, **kwargs):
  dq, dk, dv, dfq, dfk = _arrays()
  return ps.polysketch_attention(
      dq if q is None else q, dk if k is None else k, dv if v is None else v,
      dfq if fq is None else fq, dfk if fk is None else fk, **kwargs)


def test_valid_arguments_pass():
  """The baseline the error tests perturb one argument of."""
  assert attention(block_size=8).shape == (B, T, N, H)


# --- rank ---------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_qkv_wrong_rank(arg):
  bad = jnp.ones((B, T, N * H))
  with pytest.raises(ValueError, match=rf"{arg} must have rank 4 .*got shape {_shape(B, T, N * H)}"):
    attention(**{arg: bad})
  with pytest.raises(ValueError, match=r"q must have rank 4"):
    ps.polynomial_attention(bad, bad, bad)


@pytest.mark.parametrize("arg,name", [("fq", "q_features"), ("fk", "k_features")])
def test_features_wrong_rank(arg, name):
  bad = jnp.ones((B, T, N, R, 1))
  with pytest.raises(ValueError, match=rf"{name} must have rank 4 .*got shape {_shape(B, T, N, R, 1)}"):
    attention(**{arg: bad})


# --- mismatched shapes --------------------------------------------------------

@pytest.mark.parametrize("axis", [0, 1, 2, 3], ids=["batch", "seq", "heads", "head_dim"])
@pytest.mark.parametrize("arg", ["k", "v"])
def test_kv_shape_mismatch(axis, arg):
  shape = [B, T, N, H]
  shape[axis] += 1
  other = _shape(B, T, N, H)
  got = f"k {_shape(*shape)}, v {other}" if arg == "k" else f"k {other}, v {_shape(*shape)}"
  with pytest.raises(ValueError, match=rf"k and v must have the same .*got {got}"):
    attention(**{arg: jnp.ones(shape)})
  with pytest.raises(ValueError, match=r"k and v must have the same"):
    ps.polynomial_attention(*[jnp.ones(shape) if a == arg else jnp.ones((B, T, N, H))
                              for a in "qkv"])


@pytest.mark.parametrize("axis", [0, 1, 3], ids=["batch", "seq", "head_dim"])
def test_q_and_kv_disagree(axis):
  shape = [B, T, N, H]
  shape[axis] += 1
  kv = jnp.ones(shape)
  with pytest.raises(ValueError, match=rf"q and k, v must agree on \[batch, seq, ., head_dim\], "
                                       rf"got q {_shape(B, T, N, H)}, k {_shape(*shape)}"):
    attention(k=kv, v=kv)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_kv_heads_must_divide_heads(kv_heads):
  kv = jnp.ones((B, T, kv_heads, H))
  fk = jnp.ones((B, T, kv_heads, R))
  msg = rf"num_kv_heads={kv_heads} \(heads of k and v\) must divide num_heads={N}"
  with pytest.raises(ValueError, match=msg):
    attention(k=kv, v=kv, fk=fk)
  with pytest.raises(ValueError, match=msg):
    ps.polynomial_attention(jnp.ones((B, T, N, H)), kv, kv)


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["batch", "seq", "heads"])
@pytest.mark.parametrize("arg,name,like", [("fq", "q_features", "q"), ("fk", "k_features", "k")])
def test_features_mismatch(axis, arg, name, like):
  shape = [B, T, N, R]
  shape[axis] += 1
  with pytest.raises(ValueError, match=rf"{name} must match {like} on \[batch, seq, heads\]: "
                                       rf"{like} has {_shape(B, T, N, H)}, {name} has {_shape(*shape)}"):
    attention(**{arg: jnp.ones(shape)})


def test_features_sketch_dim_mismatch():
  with pytest.raises(ValueError, match=rf"q_features and k_features must have the same sketch_dim, "
                                       rf"got {_shape(B, T, N, R)} and {_shape(B, T, N, R + 1)}"):
    attention(fk=jnp.ones((B, T, N, R + 1)))


def test_features_empty_sketch_dim():
  empty = jnp.ones((B, T, N, 0))
  with pytest.raises(ValueError, match=r"sketch_dim must be positive"):
    attention(fq=empty, fk=empty)


# --- degree -------------------------------------------------------------------

@pytest.mark.parametrize("degree", [3, 1, 0, -2])
def test_bad_degree(degree):
  msg = rf"degree must be a positive even integer, got {degree}"
  with pytest.raises(ValueError, match=msg):
    attention(degree=degree)
  with pytest.raises(ValueError, match=msg):
    ps.polynomial_attention(*_arrays()[:3], degree=degree)
  with pytest.raises(ValueError, match=msg):
    ps.random_sketch_init(jax.random.key(0), H, degree=degree)


@pytest.mark.parametrize("degree", [4.0, "4", True])
def test_degree_not_int(degree):
  with pytest.raises(TypeError, match=r"degree must be an int"):
    attention(degree=degree)
  with pytest.raises(TypeError, match=r"degree must be an int"):
    ps.polynomial_attention(*_arrays()[:3], degree=degree)


@pytest.mark.parametrize("degree", [6, 10, 12])
def test_random_sketch_unsupported_degree(degree):
  with pytest.raises(ValueError, match=rf"powers of two .*got degree={degree}"):
    ps.random_sketch_init(jax.random.key(0), H, sketch_dim=R, degree=degree)


@pytest.mark.parametrize("arg,value", [("head_dim", 0), ("head_dim", 8.0), ("sketch_dim", -1)])
def test_sketch_init_bad_sizes(arg, value):
  kwargs = dict(head_dim=H, sketch_dim=R)
  kwargs[arg] = value
  for init in (ps.random_sketch_init, ps.learned_sketch_init):
    with pytest.raises(ValueError, match=rf"{arg} must be a positive int, got {value!r}"):
      init(jax.random.key(0), **kwargs)


@pytest.mark.parametrize("sketch_type", ["srht", "Hadamard", None, 1])
def test_random_sketch_unknown_type(sketch_type):
  with pytest.raises(ValueError, match=re.escape(
      f"sketch_type must be one of ('gaussian', 'hadamard'), got {sketch_type!r}")):
    ps.random_sketch_init(jax.random.key(0), H, sketch_dim=R, sketch_type=sketch_type)


@pytest.mark.parametrize("degree", [4, 8])
def test_hadamard_head_dim_not_power_of_two(degree):
  with pytest.raises(ValueError, match=r"sketch_type='hadamard' needs a head_dim that is a "
                                       r"power of two .*got head_dim=12"):
    ps.random_sketch_init(jax.random.key(0), 12, sketch_dim=R, degree=degree,
                          sketch_type="hadamard")
  # degree 2 draws no matrix (f(x) = x): any head_dim
  assert ps.random_sketch_init(jax.random.key(0), 12, degree=2, sketch_type="hadamard") == {}


def test_hadamard_sketch_dim_not_power_of_two():
  with pytest.raises(ValueError, match=r"sketch_type='hadamard' at degree >= 8 needs a sketch_dim "
                                       r"that is a power of two .*got sketch_dim=12 with degree=8"):
    ps.random_sketch_init(jax.random.key(0), H, sketch_dim=12, degree=8, sketch_type="hadamard")
  # at degree 4 sketch_dim only counts sampled columns
  params = ps.random_sketch_init(jax.random.key(0), H, sketch_dim=12, degree=4,
                                 sketch_type="hadamard")
  assert ps.random_sketch_features(params, jnp.ones((3, H))).shape == (3, 12)


@pytest.mark.parametrize("scaling", ["paper", "Official", None, 1.0])
def test_random_sketch_bad_scaling(scaling):
  params = ps.random_sketch_init(jax.random.key(0), H, sketch_dim=R)
  with pytest.raises(ValueError, match=re.escape(
      f"scaling must be one of ('unbiased', 'official'), got {scaling!r}")):
    ps.random_sketch_features(params, jnp.ones((3, H)), scaling=scaling)
  with pytest.raises(ValueError, match="scaling must be one of"):  # even for degree 2
    ps.random_sketch_features({}, jnp.ones((3, H)), scaling=scaling)


def test_random_sketch_features_bad_params():
  with pytest.raises(ValueError, match=r"params is not a random sketch from random_sketch_init: "
                                       r"a level has keys \['branch1', 'branch2'\]"):
    ps.random_sketch_features(ps.learned_sketch_init(jax.random.key(0), H, R),
                              jnp.ones((3, H)))


@pytest.mark.parametrize("value", [0, 16.0, True])
def test_learned_sketch_bad_hidden_dim(value):
  with pytest.raises(ValueError, match=rf"hidden_dim must be a positive int, got {value!r}"):
    ps.learned_sketch_init(jax.random.key(0), H, sketch_dim=R, hidden_dim=value)
  with pytest.raises(ValueError, match=rf"sketch_hidden_dim must be a positive int, got {value!r}"):
    ps.nn.PolySketchAttention(2 * H, 2, sketch_hidden_dim=value, rngs=nnx.Rngs(0))


def test_sketch_features_wrong_head_dim():
  x = jnp.ones((B, T, N, H + 1))
  for sketch_type in ("gaussian", "hadamard"):
    params = ps.random_sketch_init(jax.random.key(0), H, sketch_dim=R, degree=8,
                                   sketch_type=sketch_type)
    with pytest.raises(ValueError, match=rf"x has last dim {H + 1}, the sketch was drawn for head_dim {H}"):
      ps.random_sketch_features(params, x)
  learned = ps.learned_sketch_init(jax.random.key(0), H, sketch_dim=R)
  with pytest.raises(ValueError, match=rf"x has last dim {H + 1}, the sketch was built for head_dim {H}"):
    ps.learned_sketch_features(learned, x)


# --- block_size ---------------------------------------------------------------

@pytest.mark.parametrize("block_size", [0, -8, 4, 12, 100])
def test_bad_block_size(block_size):
  with pytest.raises(ValueError, match=rf"block_size must be a positive multiple of 8.*got {block_size}"):
    attention(block_size=block_size)


@pytest.mark.parametrize("block_size", [8.0, None])
def test_block_size_not_int(block_size):
  with pytest.raises(TypeError, match=r"block_size must be an int"):
    attention(block_size=block_size)


# --- dtypes -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
@pytest.mark.parametrize("arg,name", [("q", "q"), ("k", "k"), ("v", "v"),
                                      ("fq", "q_features"), ("fk", "k_features")])
def test_non_float_dtype(dtype, arg, name):
  shape = (B, T, N, R) if arg.startswith("f") else (B, T, N, H)
  bad = jnp.ones(shape, dtype)
  with pytest.raises(TypeError, match=rf"{name} must have a floating dtype, got "
                                      rf"{jnp.dtype(dtype).name} \(shape {_shape(*shape)}\)"):
    attention(**{arg: bad})
  if arg in ("q", "k", "v"):
    qkv = {a: (bad if a == arg else jnp.ones((B, T, N, H))) for a in "qkv"}
    with pytest.raises(TypeError, match=rf"{name} must have a floating dtype"):
      ps.polynomial_attention(qkv["q"], qkv["k"], qkv["v"])


def test_mixed_float_dtypes():
  with pytest.raises(TypeError, match=r"q, k and v must share one dtype, got q float32, "
                                      r"k bfloat16, v float32"):
    attention(k=jnp.ones((B, T, N, H), jnp.bfloat16))
  with pytest.raises(TypeError, match=r"q_features and k_features must share one dtype"):
    attention(fk=jnp.ones((B, T, N, R), jnp.bfloat16))


# --- implementation -----------------------------------------------------------

@pytest.mark.parametrize("implementation", ["cuda", "XLA", "triton", 0])
def test_unknown_implementation(implementation):
  with pytest.raises(ValueError, match=rf"implementation must be one of .*'xla'.*got {implementation!r}"):
    attention(implementation=implementation)


def test_errors_raised_under_jit():
  """The checks run on tracers too: a bad argument fails with the same message
  when the op is called inside a user's jit."""
  args = _arrays()

  @jax.jit
  def f(q, k, v, fq, fk):
    return ps.polysketch_attention(q, k, v, fq, fk, degree=3)

  with pytest.raises(ValueError, match=r"degree must be a positive even integer, got 3"):
    f(*args)
  with pytest.raises(ValueError, match=r"k_features must match k"):
    jax.jit(ps.polysketch_attention)(*args[:4], jnp.ones((B, T + 1, N, R)))


# --- normalization_bias -------------------------------------------------------

@pytest.mark.parametrize("bias", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_normalization_bias(bias):
  msg = rf"normalization_bias must be a positive finite number, got {re.escape(repr(bias))}"
  with pytest.raises(ValueError, match=msg):
    attention(normalization_bias=bias)
  with pytest.raises(ValueError, match=msg):
    ps.polynomial_attention(*_arrays()[:3], normalization_bias=bias)


@pytest.mark.parametrize("bias", [1e39, 1e-50])
def test_normalization_bias_outside_float32(bias):
  """Finite in Python but inf or 0 in the float32 denominator: 1e39 made every
  output NaN, 1e-50 a query with no weighted key 0 / 0 = NaN."""
  msg = rf"normalization_bias must lie in float32's normal range .*got {re.escape(repr(bias))}"
  with pytest.raises(ValueError, match=msg):
    attention(normalization_bias=bias)
  with pytest.raises(ValueError, match=msg):
    ps.polynomial_attention(*_arrays()[:3], normalization_bias=bias)


@pytest.mark.parametrize("bias", ["1", None, True])
def test_normalization_bias_not_a_number(bias):
  with pytest.raises(TypeError, match=r"normalization_bias must be a positive float"):
    attention(normalization_bias=bias)


# --- blocks the TPU kernel cannot tile ---------------------------------------

@pytest.mark.parametrize("block_size", [8, 64, 136])
def test_pallas_rejects_blocks_it_cannot_tile(block_size):
  """Block 64 used to pass interpret mode and fail in Mosaic lowering."""
  q, k, v, fq, fk = (jnp.ones((1, 300, 2, 64)),) * 3 + (jnp.ones((1, 300, 2, 16)),) * 2
  with pytest.raises(ValueError, match=rf"block_size={block_size} cannot be tiled by the TPU "
                                       rf"kernel: it must be a multiple of 128 .* \(>= 304\)"):
    ps.polysketch_attention(q, k, v, fq, fk, block_size=block_size, implementation="pallas",
                            interpret=True)


def test_prefill_names_the_multiple_of_128_alone():
  """prefill lays its chunk after the state's incomplete block, so no block
  covers it: the error offered "or cover the whole sequence (>= 128)" for a
  10-token chunk at block 64, which no block size can do."""
  q, fq = jnp.ones((1, 10, 2, 64)), jnp.ones((1, 10, 2, 16))
  with pytest.raises(ValueError, match=r"block_size=64 cannot be tiled by the TPU kernel: it "
                                       r"must be a multiple of 128 \(the lane width\); use "):
    ps.prefill(q, q, q, fq, fq, block_size=64, implementation="pallas", interpret=True)
  out, _ = ps.prefill(q, q, q, fq, fq, block_size=64)        # the default runs the xla path
  assert out.shape == q.shape


# --- found by an independent cross-check (2026-12-05) ---------------------------

@pytest.mark.parametrize("arg,value", [("causal", "no"), ("local_exact", "no"),
                                       ("causal", 1), ("local_exact", None)])
def test_flags_must_be_bools(arg, value):
  """A truthy string would silently switch the option on."""
  with pytest.raises(TypeError, match=f"{arg} must be a bool, got {value!r}"):
    attention(block_size=8, **{arg: value})
  assert attention(block_size=8, **{arg: np.bool_(True)}).shape == (B, T, N, H)


@pytest.mark.parametrize("value", ["no", None, 0, []])
def test_interpret_must_be_a_bool_or_interpret_params(value):
  """interpret="no" ran the kernels in interpret mode (a truthy string), and a
  list failed in jit with "Non-hashable static arguments" naming Config."""
  match = rf"interpret must be a bool or a pltpu.InterpretParams, got {re.escape(repr(value))}"
  with pytest.raises(TypeError, match=match):
    attention(block_size=8, implementation="pallas", interpret=value)
  q, k, v, fq, fk = _arrays()
  with pytest.raises(TypeError, match=match):
    ps.prefill(q, k, v, fq, fk, block_size=8, implementation="pallas", interpret=value)
  params = ps.learned_sketch_init(jax.random.key(0), H, R)
  with pytest.raises(TypeError, match=match):
    ps.learned_sketch_features(params, q, implementation="pallas", interpret=value)
  assert attention(block_size=8, interpret=np.bool_(True)).shape == (B, T, N, H)


@pytest.mark.parametrize("shape", [(B, 0, N, H), (0, T, N, H)])
def test_empty_batch_or_sequence(shape):
  q = jnp.ones(shape)
  f = jnp.ones(shape[:3] + (R,))
  with pytest.raises(ValueError, match=r"q has an empty axis: shape " + _shape(*shape)):
    ps.polysketch_attention(q, q, q, f, f, block_size=8)


def test_context_axis_name_outside_shard_map():
  with pytest.raises(ValueError, match="context_axis_name='x' is not a mesh axis"):
    attention(block_size=8, context_axis_name="x")


def test_decode_state_dtype_none_is_float32():
  """dtype=None (accepted) gave jnp.zeros' default: float64 tails with x64 on."""
  with jax.enable_x64(True):
    state = ps.init_decode_state(1, 2, 8, 4, block_size=8, dtype=None)
  for x in (state.tail_k, state.tail_v, state.tail_k_features, state.prefix_state):
    assert x.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_decode_state_dtype_must_be_floating(dtype):
  """An integer tail would truncate the stored keys and values silently."""
  with pytest.raises(TypeError, match="dtype must be a floating dtype"):
    ps.init_decode_state(1, 2, 8, 4, block_size=8, dtype=dtype)
  state = ps.init_decode_state(1, 2, 8, 4, block_size=8)
  bad = dataclasses.replace(state, tail_v=state.tail_v.astype(dtype))
  q = jnp.ones((1, 1, 2, 8))
  f = jnp.ones((1, 1, 2, 4))
  with pytest.raises(TypeError, match="must have a floating dtype"):
    ps.decode_step(bad, q, q, q, f, f)


def test_learned_sketch_features_given_other_params():
  params = ps.random_sketch_init(jax.random.PRNGKey(0), 8, 4)
  with pytest.raises(ValueError, match="not a learned sketch from learned_sketch_init"):
    ps.learned_sketch_features(params, jnp.ones((2, 8)))


def test_self_tensor_needs_a_feature_axis():
  with pytest.raises(ValueError, match=r"features must have rank >= 1"):
    ps.self_tensor(jnp.float32(2.0))


@pytest.mark.parametrize("arg", ["causal", "local_exact"])
def test_find_nonfinite_and_polynomial_flags_must_be_bools(arg):
  q, k, v, fq, fk = _arrays()
  with pytest.raises(TypeError, match=f"{arg} must be a bool, got 'no'"):
    ps.find_nonfinite(q, k, v, fq, fk, block_size=8, **{arg: "no"})
  if arg == "causal":
    with pytest.raises(TypeError, match="causal must be a bool, got 'no'"):
      ps.polynomial_attention(q, k, v, causal="no")


def _malformed_states():
  state = ps.init_decode_state(2, 2, 8, 4, block_size=8)
  bad = lambda **kw: dataclasses.replace(state, **kw)
  return {
      # a tail of another head count or batch broadcast into a wrong result
      "tail_v one kv head": (bad(tail_v=state.tail_v[:, :, :1]), ValueError, "state.tail_v must be"),
      "tail_v batch 1": (bad(tail_v=state.tail_v[:1]), ValueError, "state.tail_v must be"),
      "tail_k_features short": (bad(tail_k_features=state.tail_k_features[:, :4]), ValueError,
                                "state.tail_k_features must be"),
      "prefix_state batch 1": (bad(prefix_state=state.prefix_state[:1]), ValueError,
                               "state.prefix_state must be"),
      "normalizer [B, K, 1]": (bad(normalizer=state.normalizer[..., :1]), ValueError,
                               "state.normalizer must be"),
      "fill scalar": (bad(fill=jnp.int32(0)), ValueError, "state.fill must be"),
      "fill float": (bad(fill=jnp.zeros((2,))), TypeError, "state.fill must have an integer"),
      "prefix_state bf16": (bad(prefix_state=state.prefix_state.astype(jnp.bfloat16)),
                            TypeError, "state.prefix_state must be float32"),
      "degree 3": (bad(degree=3), ValueError, "state.degree must be a positive even"),
      "block_size 12": (bad(block_size=12), ValueError, "state.block_size must be a positive"),
  }


@pytest.mark.parametrize("case", list(_malformed_states()))
@pytest.mark.parametrize("op", ["prefill", "decode_step"])
def test_malformed_decode_state_is_refused(case, op):
  """A DecodeState whose fields disagree with each other (put together by hand or
  loaded from elsewhere) is refused naming the field: prefill broadcast a tail of
  one kv head or one row over all of them (a wrong output), decode_step ran an
  odd degree, and other fields crashed inside JAX."""
  state, error, message = _malformed_states()[case]
  q = jnp.full((2, 1 if op == "decode_step" else 3, 2, 8), 0.1)
  f = jnp.full(q.shape[:3] + (4,), 0.1)
  with pytest.raises(error, match=re.escape(message)):
    if op == "prefill":
      ps.prefill(q, q, q, f, f, state=state, block_size=state.block_size, degree=state.degree)
    else:
      ps.decode_step(state, q, q, q, f, f)


def test_prefill_normalization_bias_is_checked_with_a_state():
  state = ps.init_decode_state(1, 2, 8, 4, block_size=8)
  q, f = jnp.ones((1, 3, 2, 8)), jnp.ones((1, 3, 2, 4))
  with pytest.raises(TypeError, match="normalization_bias must be a positive float, got 'x'"):
    ps.prefill(q, q, q, f, f, state=state, block_size=8, normalization_bias="x")


def test_a_list_for_an_array_is_named_as_such():
  """A nested list reached the rank check as "got shape None"."""
  q = jnp.ones((1, 16, 2, 8))
  with pytest.raises(TypeError, match=r"q must be an array of rank 4 .*got a list"):
    ps.polysketch_attention(q.tolist(), q, q, q, q, block_size=8)
