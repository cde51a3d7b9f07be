"""Argument checks shared by the public ops.

Every check raises before tracing reaches JAX internals, and every message names
the argument and the shape or value it got.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_polysketch._compat import InterpretParams, varying_axes


def check_degree(degree, *, name: str = "degree") -> int:
  """An even positive integer: every weight (x·y)^p is then >= 0."""
  if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {degree!r} ({type(degree).__name__})")
  if degree <= 0 or degree % 2:
    raise ValueError(f"{name} must be a positive even integer, got {degree}")
  return int(degree)


def check_positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def check_block_size(block_size, *, name: str = "block_size") -> int:
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {block_size!r}")
  if block_size <= 0 or block_size % 8:
    raise ValueError(
        f"{name} must be a positive multiple of 8 (the TPU sublane tile), "
        f"got {block_size}")
  return int(block_size)


def check_bool(name: str, value) -> bool:
  """A Python or NumPy bool: a truthy string such as "no" would silently turn
  the option on."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
  return bool(value)


def check_interpret(interpret, *, name: str = "interpret"):
  """A bool or the TPU interpreter's parameters (`pltpu.InterpretParams`),
  returned as it was given (a NumPy bool as a Python bool): a truthy string
  such as "no" would silently run the kernels in interpret mode."""
  if isinstance(interpret, (bool, np.bool_)):
    return bool(interpret)
  if InterpretParams is not None and isinstance(interpret, InterpretParams):
    return interpret
  raise TypeError(f"{name} must be a bool or a pltpu.InterpretParams, got {interpret!r} "
                  f"({type(interpret).__name__})")


def check_nonempty(name: str, x, layout: str) -> None:
  if any(d == 0 for d in x.shape):
    raise ValueError(f"{name} has an empty axis: shape {tuple(x.shape)} ({layout}); "
                     "every axis must be >= 1")


def check_float_dtype(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype, got {x.dtype} (shape {x.shape})")


def check_float_dtype_arg(name: str, dtype) -> None:
  """A dtype argument: None or a real floating dtype (an integer one failed in
  an initialiser or at the first call, a complex one inside the sketch)."""
  if dtype is None:
    return
  try:
    ok = jnp.issubdtype(dtype, jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise TypeError(f"{name} must be a floating dtype (e.g. jnp.float32, jnp.bfloat16) or "
                    f"None, got {dtype!r}")


def check_rank(name: str, x, rank: int, layout: str) -> None:
  if not hasattr(x, "shape"):   # a list reported "got shape None"
    raise TypeError(f"{name} must be an array of rank {rank} ({layout}), got a "
                    f"{type(x).__name__}")
  if getattr(x, "ndim", None) != rank:
    raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {x.shape}")


def check_positive_finite(name: str, value) -> float:
  """A positive finite real number, returned as a Python float."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a positive float, got {value!r} ({type(value).__name__})")
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return float(value)


def check_normalization_bias(value, *, name: str = "normalization_bias") -> float:
  """A positive number in float32's normal range: the constant that keeps the
  (float32) denominator > 0."""
  value = check_positive_finite(name, value)
  f32 = np.finfo(np.float32)
  if not float(f32.tiny) <= value <= float(f32.max):
    # Added to the float32 denominator, it would round to inf (every output
    # NaN) or flush to 0 (0 / 0 where no key has weight).
    raise ValueError(f"{name} must lie in float32's normal range [{f32.tiny:.4g}, "
                     f"{f32.max:.4g}] (the denominator is float32), got {value!r}")
  return value


def check_qkv(q, k, v) -> None:
  """q [batch, seq, num_heads, head_dim]; k, v [batch, seq, num_kv_heads, head_dim]
  with num_kv_heads dividing num_heads; one dtype."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    check_rank(name, x, 4, "[batch, seq, heads, head_dim]")
    check_float_dtype(name, x)
  if k.shape != v.shape:
    raise ValueError(
        f"k and v must have the same [batch, seq, num_kv_heads, head_dim] shape, got "
        f"k {k.shape}, v {v.shape}")
  if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
    raise ValueError(
        "q and k, v must agree on [batch, seq, ., head_dim], got "
        f"q {q.shape}, k {k.shape}, v {v.shape}")
  check_head_groups(q.shape[2], k.shape[2])
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(
        f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")


def check_head_groups(num_heads: int, num_kv_heads: int) -> None:
  if num_kv_heads <= 0 or num_heads % num_kv_heads:
    raise ValueError(
        f"num_kv_heads={num_kv_heads} (heads of k and v) must divide "
        f"num_heads={num_heads} (heads of q) for grouped-query attention")


def check_features(q, k, q_features, k_features) -> None:
  """q_features [batch, seq, num_heads, sketch_dim] (as q), k_features
  [batch, seq, num_kv_heads, sketch_dim] (as k)."""
  for name, f, x, xname in (("q_features", q_features, q, "q"),
                            ("k_features", k_features, k, "k")):
    check_rank(name, f, 4, "[batch, seq, heads, sketch_dim]")
    check_float_dtype(name, f)
    if f.shape[:3] != x.shape[:3]:
      raise ValueError(
          f"{name} must match {xname} on [batch, seq, heads]: {xname} has {x.shape}, "
          f"{name} has {f.shape}")
  if q_features.shape[-1] != k_features.shape[-1]:
    raise ValueError(
        "q_features and k_features must have the same sketch_dim, got "
        f"{q_features.shape} and {k_features.shape}")
  if q_features.dtype != k_features.dtype:
    raise TypeError(
        "q_features and k_features must share one dtype, got "
        f"{q_features.dtype} and {k_features.dtype}")
  if q_features.shape[-1] == 0:
    raise ValueError(f"sketch_dim must be positive, got features of shape {q_features.shape}")


def check_attention_inputs(q, k, v, q_features, k_features) -> None:
  check_qkv(q, k, v)
  check_features(q, k, q_features, k_features)


def check_unchecked_shard_map(fn: str, arrays: dict, context_axis_name=None) -> None:
  """The op's scans, custom VJPs and Pallas calls do not track which manual mesh
  axes a value varies over: inside a `jax.shard_map` that checks them
  (check_vma=True, its default) they failed deep in JAX ("scan body function
  carry input and carry output must have equal types", "manual_axis_type on
  jax.ShapeDtypeStruct must not be None"). Refuse that with the way out.
  arrays: name -> an array or a pytree of them (prefill's DecodeState)."""
  varying = {name: axes for name, tree in arrays.items()
             if (axes := frozenset().union(*map(varying_axes, jax.tree.leaves(tree))))}
  if context_axis_name is not None:
    axes = varying_axes(jax.lax.axis_index(context_axis_name))
    if axes:
      varying.setdefault("context_axis_name", axes)
  if varying:
    name, axes = next(iter(varying.items()))
    raise ValueError(
        f"{fn} runs inside a jax.shard_map with check_vma=True (its default; {name} varies "
        f"over mesh axes {tuple(sorted(axes))}), which its scans and Pallas kernels do not "
        f"support: build that shard_map with check_vma=False, or use "
        f"sharded_polysketch_attention")


def check_segment_ids(segment_ids, q, *, name: str = "segment_ids"):
  """None, or integer [batch, seq] matching q's first two axes. Returns it as an
  array (lists and numpy arrays are converted)."""
  if segment_ids is None:
    return None
  if not isinstance(segment_ids, jax.Array):
    segment_ids = _int32_runs(np.asarray(segment_ids))
  if tuple(segment_ids.shape) != tuple(q.shape[:2]):
    raise ValueError(
        f"{name} must be [batch, seq] = {tuple(q.shape[:2])} (the first two axes of q), "
        f"got shape {tuple(segment_ids.shape)}")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError(
        f"{name} must have an integer dtype (e.g. int32), got {segment_ids.dtype} "
        f"(shape {tuple(segment_ids.shape)})")
  return segment_ids


def _int32_runs(ids: np.ndarray) -> np.ndarray:
  """Host ids (a list or numpy array) whose values do not fit the int32 JAX
  would convert them to (64-bit ids without jax_enable_x64, e.g. hashes) as
  int32 labels of the same runs: only where neighbours differ matters, and the
  truncation merged ids equal modulo 2^32 into one segment."""
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
    return ids
  target = jax.dtypes.canonicalize_dtype(ids.dtype)
  info = np.iinfo(target)
  if target == ids.dtype or info.min <= ids.min() and ids.max() <= info.max:
    return ids
  changes = np.concatenate([np.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  return np.cumsum(changes, axis=1, dtype=np.int32)


def check_prng_key(name: str, key) -> None:
  """One PRNG key: a typed key (`jax.random.key`, shape ()) or legacy raw key
  data (`jax.random.PRNGKey`, uint32 [n]). An int seed failed inside JAX with
  "invalid PRNG key data", naming no argument."""
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    ok = shape == ()
  else:
    ok = dtype == np.uint32 and shape is not None and len(shape) == 1
  if not ok:
    raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed)), got {key!r}")


def check_choice(name: str, value, allowed: tuple) -> str:
  """One of a few allowed strings; the error lists them."""
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  return value


def is_power_of_two(n: int) -> bool:
  return n > 0 and not n & (n - 1)
