"""Feature maps f: R^H -> R^r with <f(x), f(y)> ~ <x, y>^(p/2)  (DESIGN §1.2).

Self-tensoring then gives phi(x) = f(x) (x) f(x) with <phi(x), phi(y)> =
<f(x), f(y)>^2 >= 0, the non-negative r^2-dim features the prefix states use.
All functions here are pure JAX; the attention op takes their r-dim output.
"""
from __future__ import annotations

import collections.abc
import functools
import math

import jax
import jax.numpy as jnp

from pallas_polysketch import _compat, _pallas_features, _validation
from pallas_polysketch._platform import require_tpu
from pallas_polysketch.polynomial import compute_dtype
from pallas_polysketch.tpu_config import TileConfig, resolve_feature_tiles

LAYER_NORM_EPS = _pallas_features.LAYER_NORM_EPS


def self_tensor(features: jax.Array) -> jax.Array:
  """phi = f (x) f, flattened: [..., r] -> [..., r*r], phi[a*r + b] = f[a] f[b]."""
  if not hasattr(features, "shape") or not hasattr(features, "dtype"):
    features = jnp.asarray(features)   # a list or a Python scalar (as `_check_x` does)
  if features.ndim < 1:
    raise ValueError(f"features must have rank >= 1 ([..., r]), got shape {features.shape}")
  r = features.shape[-1]
  outer = features[..., :, None] * features[..., None, :]
  return outer.reshape(*features.shape[:-1], r * r)


# ----------------------------------------------------------------------------
# Random sketch (paper, Algorithm 1).
# ----------------------------------------------------------------------------

def check_random_degree(degree) -> int:
  """A degree the random sketch supports: a power of two >= 2."""
  degree = _validation.check_degree(degree)
  if degree & (degree - 1):
    raise ValueError(
        f"the random sketch needs a degree that is a power of two; it supports "
        f"powers of two (2, 4, 8, ...), got degree={degree}")
  return degree


SKETCH_TYPES = ("gaussian", "hadamard")
SKETCH_SCALINGS = ("unbiased", "official")


def check_sketch_type(sketch_type, head_dim: int, sketch_dim: int, degree: int) -> str:
  """A random sketch type that fits these (already checked) sizes.

  "hadamard" maps d_in -> sketch_dim with sampled columns of the d_in x d_in
  Hadamard matrix at every level, so d_in must be a power of two: head_dim at
  the first level and, from degree 8 on, sketch_dim above it. Degree 2 draws
  no matrix and has no constraint.
  """
  sketch_type = _validation.check_choice("sketch_type", sketch_type, SKETCH_TYPES)
  if sketch_type == "hadamard" and degree > 2:
    if not _validation.is_power_of_two(head_dim):
      raise ValueError(
          f"sketch_type='hadamard' needs a head_dim that is a power of two (it "
          f"samples columns of the head_dim x head_dim Hadamard matrix), got "
          f"head_dim={head_dim}; use sketch_type='gaussian' for other sizes")
    if degree >= 8 and not _validation.is_power_of_two(sketch_dim):
      raise ValueError(
          f"sketch_type='hadamard' at degree >= 8 needs a sketch_dim that is a "
          f"power of two (the levels above the first map sketch_dim -> "
          f"sketch_dim with a Hadamard matrix), got sketch_dim={sketch_dim} "
          f"with degree={degree}")
  return sketch_type


def check_sketch_scaling(scaling) -> str:
  """The scaling of each sketch level: one of SKETCH_SCALINGS."""
  return _validation.check_choice("scaling", scaling, SKETCH_SCALINGS)


def random_sketch_init(key: jax.Array, head_dim: int, sketch_dim: int = 32,
                       degree: int = 4, *, sketch_type: str = "gaussian") -> dict:
  """Draws the random matrices of the sketch f = S_(degree/2) (Algorithm 1).

  S_1(x) = x, and S_2m(x) = (S_m'(x) M1 * S_m''(x) M2) / sqrt(sketch_dim) with
  S_m', S_m'' independent copies and M1, M2 independent [d_in, sketch_dim]
  matrices whose columns have i.i.d. mean-zero, unit-variance entries. Then
  E <f(x), f(y)> = <x, y>^(degree/2) (unbiased; see `random_sketch_features`
  for the official code's 1/r scaling).

  sketch_type picks M:
    "gaussian": i.i.d. N(0, 1) entries.
    "hadamard": M = D H[:, c], the SRHT-style sketch of the paper's official
      code: D diagonal with i.i.d. random signs, H the d_in x d_in Sylvester
      Hadamard matrix (entries +-1, unnormalised) and c sketch_dim column
      indices drawn uniformly with replacement. Every column of M is then a
      vector of i.i.d. random signs. Stored as the signs and the indices, not
      as M. Used at every level, so d_in (head_dim at the first level,
      sketch_dim above it, i.e. from degree 8 on) must be a power of two.

  Args:
    key: a PRNG key.
    head_dim: H, the size of the vectors the sketch maps.
    sketch_dim: r, the feature size (unused for degree 2, but still checked to
      be a positive int).
    degree: p, a power of two >= 2. degree=2 gives the identity map f(x) = x
      (exact features of size head_dim).
    sketch_type: "gaussian" (default) or "hadamard".

  Returns:
    A pytree of arrays: {} for degree 2; else, per level, for "gaussian"
    {"g1": f32[d_in, r], "g2": f32[d_in, r], "left": ..., "right": ...} and
    for "hadamard" {"signs1": f32[d_in] (+-1), "cols1": i32[r], "signs2":
    f32[d_in], "cols2": i32[r], "left": ..., "right": ...}, with d_in =
    head_dim at the innermost level and r above it.
  """
  _validation.check_prng_key("key", key)
  degree = check_random_degree(degree)
  _validation.check_positive_int("head_dim", head_dim)
  _validation.check_positive_int("sketch_dim", sketch_dim)
  sketch_type = check_sketch_type(sketch_type, head_dim, sketch_dim, degree)

  def matrices(k1, k2, d_in):
    if sketch_type == "gaussian":
      return {
          "g1": jax.random.normal(k1, (d_in, sketch_dim), jnp.float32),
          "g2": jax.random.normal(k2, (d_in, sketch_dim), jnp.float32),
      }
    out = {}
    for i, k in (("1", k1), ("2", k2)):
      k_signs, k_cols = jax.random.split(k)
      out["signs" + i] = jax.random.rademacher(k_signs, (d_in,), jnp.float32)
      out["cols" + i] = jax.random.randint(k_cols, (sketch_dim,), 0, d_in, jnp.int32)
    return out

  def init(key, level):  # parameters of S_level
    if level == 1:
      return {}
    k1, k2, k_left, k_right = jax.random.split(key, 4)
    d_in = head_dim if level == 2 else sketch_dim
    return {
        **matrices(k1, k2, d_in),
        "left": init(k_left, level // 2),
        "right": init(k_right, level // 2),
    }

  return init(key, degree // 2)


def _hadamard_columns(signs: jax.Array, cols: jax.Array, dtype=jnp.float32) -> jax.Array:
  """The sampled, sign-flipped Hadamard matrix D H[:, cols]: [d] x [r] -> [d, r].

  H is the Sylvester Hadamard matrix of size d = len(signs) (a power of two),
  H[i, j] = (-1)^popcount(i & j) (= scipy.linalg.hadamard(d)), unnormalised.
  """
  rows = jnp.arange(signs.shape[0], dtype=jnp.int32)
  parity = jax.lax.population_count(rows[:, None] & cols[None, :].astype(jnp.int32)) & 1
  h = (1 - 2 * parity).astype(dtype)
  return signs.astype(dtype)[:, None] * h


_GAUSSIAN_KEYS = {"g1", "g2", "left", "right"}
_HADAMARD_KEYS = {"signs1", "cols1", "signs2", "cols2", "left", "right"}


def _check_level(params) -> None:
  keys = set(params) if isinstance(params, collections.abc.Mapping) else None
  if keys not in (_GAUSSIAN_KEYS, _HADAMARD_KEYS):
    raise ValueError(
        f"params is not a random sketch from random_sketch_init: a level has "
        f"keys {sorted(keys) if keys is not None else type(params).__name__}, "
        f"expected {sorted(_GAUSSIAN_KEYS)} (gaussian) or "
        f"{sorted(_HADAMARD_KEYS)} (hadamard)")
  for name in ("cols1", "cols2"):
    cols = params.get(name)
    dtype = getattr(cols, "dtype", None)
    if cols is not None and (dtype is None or not jnp.issubdtype(dtype, jnp.integer)):
      # a params tree cast to bf16 rounded the column indices above 256 (and a
      # float32 one truncated fractions) into other Hadamard columns, silently
      raise TypeError(
          f"params {name} (the sampled Hadamard column indices) must have an integer "
          f"dtype (int32, as random_sketch_init makes them), got {dtype or type(cols).__name__}; "
          f"cast only the floating leaves of the sketch's params")


def _level_matrices(params: dict, x_dtype):
  if "g1" in params:
    return params["g1"], params["g2"]
  dtype = jnp.result_type(x_dtype, params["signs1"].dtype)  # as x @ g1 would
  return (_hadamard_columns(params["signs1"], params["cols1"], dtype),
          _hadamard_columns(params["signs2"], params["cols2"], dtype))


def random_sketch_features(params: dict, x: jax.Array, *,
                           scaling: str = "unbiased") -> jax.Array:
  """Applies the random sketch: [..., head_dim] -> [..., sketch_dim].

  Dispatches on the structure of params (gaussian or hadamard levels, see
  `random_sketch_init`). For degree-2 params ({}), returns x itself
  ([..., head_dim]).

  Args:
    params: from `random_sketch_init`.
    x: [..., head_dim].
    scaling: the factor of each level S_2m = c (S_m' M1 * S_m'' M2).
      "unbiased" (default): c = 1/sqrt(r), E <f(x), f(y)> = <x, y>^(degree/2).
      "official": c = 1/r, as the paper's official code (which scales each
      [d_in, r] matrix by 1/sqrt(r)); to reproduce its checkpoints. Then
      f_official = r^(-(degree/2 - 1)/2) f_unbiased, so every sketched weight
      <f(q), f(k)>^2 is r^-(degree - 2) times the unbiased one (1/r^2 at
      degree 4, 1/r^6 at degree 8).

  Returns:
    [..., sketch_dim] features in the promoted dtype of x and the matrices.
  """
  if not isinstance(params, collections.abc.Mapping):
    # None, [] or () was taken as degree 2's {}: the identity, silently
    raise ValueError(f"params is not a random sketch from random_sketch_init: got "
                     f"{type(params).__name__}, expected a dict ({{}} for degree 2)")
  check_sketch_scaling(scaling)
  x = _check_x(x)
  if params and x.shape[-1] != _sketch_head_dim(params):
    raise ValueError(
        f"x has last dim {x.shape[-1]}, the sketch was drawn for head_dim "
        f"{_sketch_head_dim(params)}")
  return _apply_random_sketch(params, x, scaling)


def _apply_random_sketch(params: dict, x: jax.Array, scaling: str) -> jax.Array:
  if not params:
    return x
  _check_level(params)
  left = _apply_random_sketch(params["left"], x, scaling)
  right = _apply_random_sketch(params["right"], x, scaling)
  m1, m2 = _level_matrices(params, left.dtype)
  sketch_dim = m1.shape[1]
  divisor = math.sqrt(sketch_dim) if scaling == "unbiased" else sketch_dim
  return (left @ m1) * (right @ m2) / divisor


def _sketch_head_dim(params: dict) -> int:
  """The input size of the innermost level; checks the structure on the way."""
  _check_level(params)
  while params["left"]:
    params = params["left"]
    _check_level(params)
  return params["g1"].shape[0] if "g1" in params else params["signs1"].shape[0]


# ----------------------------------------------------------------------------
# Learned sketch (paper §4).
# ----------------------------------------------------------------------------

def _check_x(x):
  """x as an array of rank >= 1 ([..., head_dim]); a list is converted."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError(f"x must be [..., head_dim] (rank >= 1), got a scalar of shape {x.shape}")
  return x


@jax.custom_vjp
def _twice_gelu(x):
  """2 jax.nn.gelu(x) (the tanh form) in float32 arithmetic (float64 for
  float64 x), returned in x's dtype; the caller puts the 1/2 in the next
  Dense kernel (exact: a power of two). Its VJP keeps only x and recomputes tanh with the derivative written
  out: fewer vector ops than autodiff's on TPU (BUILD_NOTES, "What the
  learned sketch costs"). The formulas are the feature kernels'
  (`_pallas_features.twice_gelu`)."""
  return _pallas_features.twice_gelu(x, compute_dtype(x), slope=False)[0].astype(x.dtype)


def _twice_gelu_fwd(x):
  return _twice_gelu(x), x


def _twice_gelu_bwd(x, dy):
  cd = compute_dtype(x)
  _, slope = _pallas_features.twice_gelu(x, cd, slope=True)
  return ((slope * dy.astype(cd)).astype(x.dtype),)


_twice_gelu.defvjp(_twice_gelu_fwd, _twice_gelu_bwd)


def _normalized(x):
  """LayerNorm without its affine, computed in float32 (float64 for float64
  x): [..., d] -> that dtype [..., d]."""
  x32 = x.astype(compute_dtype(x))
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)


def _layer_norm(x, scale, bias):
  return (_normalized(x) * scale + bias).astype(x.dtype)


def learned_sketch_init(key: jax.Array, head_dim: int, sketch_dim: int = 32,
                        hidden_dim: int | None = None) -> dict:
  """Parameters of the learned sketch f(x) = sqrt(r) tanh(g1(x) * g2(x) / sqrt(r)).

  Each branch g is two stacked blocks LayerNorm -> Dense(hidden_dim, no bias) ->
  GELU -> Dense(r, no bias); the first maps head_dim -> r, the second r -> r.
  Dense kernels use LeCun-normal initialisation.

  Args: key, a PRNG key; head_dim, H; sketch_dim, r; hidden_dim (positive
  ints).

  hidden_dim defaults to 8r, the paper's width. A narrower one is a cheaper,
  different model: on TPU the features' cost is the GELU's vector work on the
  hidden units, about proportional to hidden_dim (bench/TPU_SCHEDULE.md,
  "A narrower learned sketch"); its quality is measured in bench/LM_QUALITY.md.

  Returns:
    {"branch1": [block, block], "branch2": [block, block]} with each block
    {"ln_scale": [d_in], "ln_bias": [d_in], "w_in": [d_in, hidden_dim],
     "w_out": [hidden_dim, r]}.
  """
  _validation.check_prng_key("key", key)
  _validation.check_positive_int("head_dim", head_dim)
  _validation.check_positive_int("sketch_dim", sketch_dim)
  hidden = 8 * sketch_dim if hidden_dim is None else _validation.check_positive_int(
      "hidden_dim", hidden_dim)

  def block(key, d_in):
    k_in, k_out = jax.random.split(key)
    return {
        "ln_scale": jnp.ones((d_in,), jnp.float32),
        "ln_bias": jnp.zeros((d_in,), jnp.float32),
        "w_in": jax.random.normal(k_in, (d_in, hidden), jnp.float32) / math.sqrt(d_in),
        "w_out": jax.random.normal(k_out, (hidden, sketch_dim), jnp.float32) / math.sqrt(hidden),
    }

  keys = jax.random.split(key, 4)
  return {
      "branch1": [block(keys[0], head_dim), block(keys[1], sketch_dim)],
      "branch2": [block(keys[2], head_dim), block(keys[3], sketch_dim)],
  }


def _dense_block(p, x):
  """LayerNorm -> Dense(hidden_dim) -> GELU -> Dense(r) on x [..., d_in]."""
  x = _layer_norm(x, p["ln_scale"], p["ln_bias"])
  # GELU's 1/2 in w_out (`_twice_gelu`)
  return _twice_gelu(x @ p["w_in"].astype(x.dtype)) @ (0.5 * p["w_out"]).astype(x.dtype)


def learned_sketch_features(params: dict, x: jax.Array, *, implementation: str | None = None,
                            interpret: bool = False,
                            tile_config: TileConfig | None = None) -> jax.Array:
  """Applies the learned sketch: [..., head_dim] -> [..., sketch_dim].

  The same params map q and k, so <f(q), f(k)> stays symmetric.

  The two branches' first blocks share the LayerNorm statistics of x and run
  as one matmul against both Dense kernels, each with its LayerNorm affine
  folded in ((x_hat s + c) W = x_hat (s W) + c W): the same function as
  `learned_sketch_init` documents, rounded differently at the dtype's
  precision.

  Args:
    params: from `learned_sketch_init`.
    x: [..., head_dim], floating; q or k as [B, T, N, head_dim] for the Pallas
      kernels. LayerNorms and GELUs compute in float32 (float64 for float64
      x), the matmuls in x's dtype; parameters of any dtype are folded in
      float32. Returns x's dtype.
    implementation: None (the Pallas kernels when lowering for TPU and x is a
      non-empty bfloat16 or float32 [B, T, N, head_dim] with head_dim a
      multiple of 8, not inside a `jax.shard_map` with check_vma=True; the
      xla path otherwise),
      "pallas" (the kernels; raises for other inputs), or "xla" (pure JAX).
    interpret: for "pallas": run the kernels in interpret mode on any backend.
    tile_config: the kernels' `TileConfig` (its `features_tile`, `bf16_gelu`,
      `vmem_limit_bytes` and `generation`); None: the local TPU's defaults.

  Under automatic sharding (jit over arrays sharded across devices) the
  Pallas kernels split x over its first axis (each device its own rows, the
  weights' gradients summed over them); x sharded over another axis is
  gathered first. There, call this inside `shard_map` (check_vma=False for
  the kernels) or pass implementation="xla" (the Flax layer does the latter
  when given a mesh).

  The xla path views x off TPU as one [M, head_dim] matrix (M = the product
  of the leading dims): XLA on CPU contracts the weight gradients of a 2-D
  operand about twice as fast as over several batch dims. On TPU that reshape
  is a layout copy of x and of the features (and again in the backward), so
  x keeps its shape there.

  Differentiable in reverse mode (`jax.grad`, `jax.vjp`), as the attention
  op is; not in forward mode (`jax.jvp`): the GELU inside has a custom VJP.
  """
  if not (isinstance(params, collections.abc.Mapping)
          and set(params) == {"branch1", "branch2"}):
    got = sorted(params) if isinstance(params, collections.abc.Mapping) else type(params).__name__
    raise ValueError(f"params is not a learned sketch from learned_sketch_init: got keys {got}, "
                     "expected ['branch1', 'branch2']")
  x = _check_x(x)
  # An integer x was rounded to the integers through every layer (zeros out).
  _validation.check_float_dtype("x", x)
  head_dim = params["branch1"][0]["w_in"].shape[0]
  if x.shape[-1] != head_dim:
    raise ValueError(f"x has last dim {x.shape[-1]}, the sketch was built for head_dim {head_dim}")
  if implementation not in (None, "xla", "pallas"):
    raise ValueError(
        f"implementation must be one of (None, 'xla', 'pallas'), got {implementation!r}")
  interpret = _validation.check_interpret(interpret)
  if tile_config is not None and not isinstance(tile_config, TileConfig):
    # a TypeError, as polysketch_attention's and prefill's for the same argument
    raise TypeError(f"tile_config must be a TileConfig or None, got {tile_config!r} "
                    f"({type(tile_config).__name__})")
  lead = x.shape[:-1]
  sketch_dim = params["branch1"][-1]["w_out"].shape[1]
  kernel_problem = _features_kernel_problem(x)
  if implementation == "pallas" and kernel_problem:
    raise ValueError(f"learned_sketch_features(implementation='pallas'): {kernel_problem}; "
                     "implementation=None or 'xla' runs the pure-JAX path")

  def kernels(x):
    if not interpret:
      x = require_tpu(x, op="learned_sketch_features")
    tiles = resolve_feature_tiles(
        tile_config, x.shape[1], x.dtype, hidden_dim=params["branch1"][0]["w_in"].shape[1],
        head_dim=head_dim, sketch_dim=sketch_dim)
    return _pallas_features.learned_features(_folded_weights(params), x, tiles,
                                             interpret=interpret)

  def as_matrix(x):
    # sketch_dim, not -1: an empty x has no size to infer it from
    return _learned_features(params, x.reshape(-1, head_dim)).reshape(*lead, sketch_dim)

  if implementation == "pallas":
    return kernels(x)
  on_tpu = kernels if implementation is None and not kernel_problem else functools.partial(
      _learned_features, params)
  return jax.lax.platform_dependent(x, tpu=on_tpu, default=as_matrix)


def _features_kernel_problem(x) -> str | None:
  """Why the Pallas feature kernels cannot take x, or None."""
  if x.ndim != 4:
    return f"x must be [B, T, N, head_dim] for the kernels, got shape {x.shape}"
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    return f"x must be bfloat16 or float32 for the kernels, got {x.dtype}"
  if x.shape[-1] % 8:
    return f"head_dim must be a multiple of 8 for the kernels, got {x.shape[-1]}"
  if 0 in x.shape:
    return f"x is empty: shape {x.shape}"
  if axes := _compat.varying_axes(x):
    # pallas_call's outputs carry no varying axes: "manual_axis_type on
    # jax.ShapeDtypeStruct must not be None" from inside jax
    return (f"x varies over mesh axes {tuple(sorted(axes))} of a jax.shard_map with "
            "check_vma=True (its default), which the kernels do not support; build "
            "the shard_map with check_vma=False")
  return None


def _folded_weights(params: dict, dtype=jnp.float32) -> tuple:
  """The learned sketch's weights as the feature kernels take them (in dtype,
  float32 for the kernels, stacked over the two branches, transposed): each
  LayerNorm's affine folded into the Dense kernel after it, GELU's 1/2 into
  the one after that, the products formed in dtype whatever the parameters'
  (bf16 parameters folded in bf16 cost float32 inputs 1e-3 of accuracy).
  (w1_t [2, h, H], c1 [2, h, 1], a_t [2, r, h], w2_t [2, h, r], c2 [2, h, 1],
  b_t [2, r, h]); see `_pallas_features`."""
  branches = (params["branch1"], params["branch2"])

  def folded(block):
    block = {name: value.astype(dtype) for name, value in block.items()}
    w_in = (block["ln_scale"][:, None] * block["w_in"]).T
    return w_in, (block["ln_bias"] @ block["w_in"])[:, None], (0.5 * block["w_out"]).T

  first, second = ([folded(p[i]) for p in branches] for i in (0, 1))
  stack = lambda parts, j: jnp.stack([part[j] for part in parts])
  return (stack(first, 0), stack(first, 1), stack(first, 2),
          stack(second, 0), stack(second, 1), stack(second, 2))


def _learned_features(params: dict, x: jax.Array) -> jax.Array:
  """`learned_sketch_features` on x [..., head_dim] as it is (the xla path)."""
  b1, b2 = params["branch1"], params["branch2"]
  dt = x.dtype
  x_hat = _normalized(x)
  w1_t, c1, a_t = _folded_weights(params, compute_dtype(x))[:3]
  w_in = jnp.concatenate([w1_t[0].T, w1_t[1].T], axis=1)
  c_in = jnp.concatenate([c1[0, :, 0], c1[1, :, 0]])
  hidden = _twice_gelu(x_hat.astype(dt) @ w_in.astype(dt) + c_in.astype(dt))   # [..., 2 * hidden_dim]
  width = b1[0]["w_in"].shape[1]
  # GELU's 1/2 in each branch's w_out (`_twice_gelu`)
  g1, g2 = (_dense_block(p[1], hidden[..., i * width:(i + 1) * width] @ a_t[i].T.astype(dt))
            for i, p in enumerate((b1, b2)))
  scale = math.sqrt(g1.shape[-1])
  return scale * jnp.tanh(g1 * g2 / scale)
