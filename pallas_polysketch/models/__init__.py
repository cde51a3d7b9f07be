"""Example models built on the pallas_polysketch layers."""
from pallas_polysketch.models.gpt import GPT, CharTokenizer, GPTConfig

__all__ = ["GPT", "GPTConfig", "CharTokenizer"]
