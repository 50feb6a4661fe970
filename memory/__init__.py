"""The Titans neural long-term memory and persistent memory tokens, usable on their own."""

from titans_lnn.memory.neural_memory import NeuralMemory
from titans_lnn.memory.persistent import PersistentMemory

__all__ = ["NeuralMemory", "PersistentMemory"]
