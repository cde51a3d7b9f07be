"""Version shims for the Pallas and JAX APIs that moved between jax 0.10 and 0.12.

Everything version-dependent is imported from here, nowhere else.
"""
from __future__ import annotations

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Renamed from TPUCompilerParams in older releases.
TPUCompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")

# The TPU interpreter's parameters (random grid order, NaN-filled scratch,
# bounds checks); absent in older releases.
InterpretParams = getattr(pltpu, "InterpretParams", None) or getattr(pltpu, "TPUInterpretParams", None)

CostEstimate = pl.CostEstimate

import jax as _jax


def shard_map(f, *, mesh, in_specs, out_specs):
  """jax.shard_map (jax >= 0.8), replication checks off: a Pallas call has no
  replication rule."""
  return _jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                        check_vma=False)


def varying_axes(x) -> frozenset:
  """The manual mesh axes x varies over inside a `jax.shard_map` that checks
  them (check_vma=True, its default): `aval.vma` in newer releases,
  `aval.mat.varying` in jax 0.10. Empty outside shard_map, with
  check_vma=False, and for anything that is not an array."""
  try:
    aval = _jax.typeof(x)
  except TypeError:
    return frozenset()
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", None)
  return frozenset(vma or ())
