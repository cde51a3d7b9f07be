"""pallas_polysketch: PolySketchFormer attention for JAX, with Pallas TPU kernels.

Public tensors use the `jax.nn.dot_product_attention` layout
[batch, seq, heads, head_dim].
"""
from pallas_polysketch._version import __version__
from pallas_polysketch.attention import polysketch_attention
from pallas_polysketch.decode import DecodeState, decode_step, init_decode_state, prefill
from pallas_polysketch.debug import NonFinite, find_nonfinite
from pallas_polysketch.polynomial import polynomial_attention
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
    "find_nonfinite",
    "NonFinite",
    "TileConfig",
    "random_sketch_init",
    "random_sketch_features",
    "learned_sketch_init",
    "learned_sketch_features",
    "self_tensor",
]
