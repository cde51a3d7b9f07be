"""Feature maps f: R^H -> R^r with <f(x), f(y)> ~ <x, y>^(p/2)  (DESIGN §1.2).

Self-tensoring then gives phi(x) = f(x) (x) f(x) with <phi(x), phi(y)> =
<f(x), f(y)>^2 >= 0, the non-negative r^2-dim features the prefix states use.
All functions here are pure JAX; the attention op takes their r-dim output.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_polysketch import _validation

LAYER_NORM_EPS = 1e-5


def self_tensor(features: jax.Array) -> jax.Array:
  """phi = f (x) f, flattened: [..., r] -> [..., r*r], phi[a*r + b] = f[a] f[b]."""
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


def random_sketch_init(key: jax.Array, head_dim: int, sketch_dim: int = 32,
                       degree: int = 4) -> dict:
  """Draws the Gaussian matrices of the random sketch f = S_(degree/2).

  S_1(x) = x, and S_2m(x) = (S_m'(x) G1 * S_m''(x) G2) / sqrt(sketch_dim) with
  S_m', S_m'' independent copies. The result is unbiased:
  E <f(x), f(y)> = <x, y>^(degree/2).

  Args:
    key: a PRNG key.
    head_dim: H, the size of the vectors the sketch maps.
    sketch_dim: r, the feature size (ignored for degree 2).
    degree: p, a power of two >= 2. degree=2 gives the identity map f(x) = x
      (exact features of size head_dim).

  Returns:
    A pytree of float32 matrices: {} for degree 2, else
    {"g1": [d_in, r], "g2": [d_in, r], "left": ..., "right": ...} with d_in =
    head_dim at the innermost level and r above it.
  """
  degree = check_random_degree(degree)
  _validation.check_positive_int("head_dim", head_dim)
  _validation.check_positive_int("sketch_dim", sketch_dim)

  def init(key, level):  # parameters of S_level
    if level == 1:
      return {}
    k1, k2, k_left, k_right = jax.random.split(key, 4)
    d_in = head_dim if level == 2 else sketch_dim
    return {
        "g1": jax.random.normal(k1, (d_in, sketch_dim), jnp.float32),
        "g2": jax.random.normal(k2, (d_in, sketch_dim), jnp.float32),
        "left": init(k_left, level // 2),
        "right": init(k_right, level // 2),
    }

  return init(key, degree // 2)


def random_sketch_features(params: dict, x: jax.Array) -> jax.Array:
  """Applies the random sketch: [..., head_dim] -> [..., sketch_dim].

  For degree-2 params ({}), returns x itself ([..., head_dim]).
  """
  if not params:
    return x
  left = random_sketch_features(params["left"], x)
  right = random_sketch_features(params["right"], x)
  if left.shape[-1] != params["g1"].shape[0]:
    raise ValueError(
        f"x has last dim {x.shape[-1]}, the sketch was drawn for head_dim "
        f"{_sketch_head_dim(params)}")
  sketch_dim = params["g1"].shape[1]
  return (left @ params["g1"]) * (right @ params["g2"]) / math.sqrt(sketch_dim)


def _sketch_head_dim(params: dict) -> int:
  while params["left"]:
    params = params["left"]
  return params["g1"].shape[0]


# ----------------------------------------------------------------------------
# Learned sketch (paper §4).
# ----------------------------------------------------------------------------

def _layer_norm(x, scale, bias):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)
  return (y * scale + bias).astype(x.dtype)


def learned_sketch_init(key: jax.Array, head_dim: int, sketch_dim: int = 32) -> dict:
  """Parameters of the learned sketch f(x) = sqrt(r) tanh(g1(x) * g2(x) / sqrt(r)).

  Each branch g is two stacked blocks LayerNorm -> Dense(8r, no bias) -> GELU ->
  Dense(r, no bias); the first maps head_dim -> r, the second r -> r. Dense
  kernels use LeCun-normal initialisation.

  Returns:
    {"branch1": [block, block], "branch2": [block, block]} with each block
    {"ln_scale": [d_in], "ln_bias": [d_in], "w_in": [d_in, 8r], "w_out": [8r, r]}.
  """
  _validation.check_positive_int("head_dim", head_dim)
  _validation.check_positive_int("sketch_dim", sketch_dim)
  hidden = 8 * sketch_dim

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


def _learned_branch(blocks, x):
  for p in blocks:
    x = _layer_norm(x, p["ln_scale"], p["ln_bias"])
    x = jax.nn.gelu(x @ p["w_in"].astype(x.dtype)) @ p["w_out"].astype(x.dtype)
  return x


def learned_sketch_features(params: dict, x: jax.Array) -> jax.Array:
  """Applies the learned sketch: [..., head_dim] -> [..., sketch_dim].

  The same params map q and k, so <f(q), f(k)> stays symmetric.
  """
  head_dim = params["branch1"][0]["w_in"].shape[0]
  if x.shape[-1] != head_dim:
    raise ValueError(f"x has last dim {x.shape[-1]}, the sketch was built for head_dim {head_dim}")
  g1 = _learned_branch(params["branch1"], x)
  g2 = _learned_branch(params["branch2"], x)
  scale = math.sqrt(g1.shape[-1])
  return scale * jnp.tanh(g1 * g2 / scale)
