"""pallas_polysketch: PolySketchFormer attention for JAX, with Pallas TPU kernels.

Public tensors use the `jax.nn.dot_product_attention` layout
[batch, seq, heads, head_dim].

`pallas_polysketch.nn` (the Flax layers) and `pallas_polysketch.models` (a
small GPT) are reachable as attributes after `import pallas_polysketch as ps`
(`ps.nn.PolySketchAttention`, `ps.models.gpt.GPT`); they are imported on first
use, so the attention op alone does not import Flax.
"""
import importlib as _importlib

from pallas_polysketch._version import __version__
from pallas_polysketch.attention import polysketch_attention
from pallas_polysketch.decode import DecodeState, decode_step, init_decode_state, prefill
from pallas_polysketch.debug import NonFinite, find_nonfinite
from pallas_polysketch.polynomial import polynomial_attention
from pallas_polysketch.sharding import sharded_polysketch_attention
from pallas_polysketch.tpu_config import TileConfig
from pallas_polysketch.sketches import (
    learned_sketch_features,
    learned_sketch_init,
    random_sketch_features,
    random_sketch_init,
    self_tensor,
)

__all__ = [
    "__version__",
    "polynomial_attention",
    "polysketch_attention",
    "DecodeState",
    "init_decode_state",
    "prefill",
    "decode_step",
    "sharded_polysketch_attention",
    "find_nonfinite",
    "NonFinite",
    "TileConfig",
    "random_sketch_init",
    "random_sketch_features",
    "learned_sketch_init",
    "learned_sketch_features",
    "self_tensor",
]

_LAZY_SUBMODULES = ("models", "nn")


def __getattr__(name):
  # PEP 562: `ps.nn` / `ps.models` import the submodule on first access (the
  # import also binds it here, so later accesses skip this function).
  if name in _LAZY_SUBMODULES:
    return _importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))
