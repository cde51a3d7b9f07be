"""Pure-JAX references for pallas_polysketch, written for clarity, not speed.

Installed as ``pallas_polysketch.ref``. Every kernel and the ``xla`` path are
tested against these (DESIGN.md §3.1). Shapes use the
``jax.nn.dot_product_attention`` layout [batch, seq, heads, head_dim].
"""
from pallas_polysketch.polynomial import polynomial_attention
from pallas_polysketch.ref.attention import (
    polysketch_attention_blocked,
    polysketch_attention_quadratic,
    polysketch_weights,
)
from pallas_polysketch.sketches import (
    learned_sketch_features,
    learned_sketch_init,
    random_sketch_features,
    random_sketch_init,
    self_tensor,
)

__all__ = [
    "polynomial_attention",
    "polysketch_weights",
    "polysketch_attention_quadratic",
    "polysketch_attention_blocked",
    "random_sketch_init",
    "random_sketch_features",
    "learned_sketch_init",
    "learned_sketch_features",
    "self_tensor",
]
