"""titans-lnn: long-context language models with sliding-window attention, a liquid recurrent core
and a Titans neural long-term memory, streaming to millions of tokens in fixed memory."""

from titans_lnn.attention import SlidingWindowAttention
from titans_lnn.blocks import MIXERS, Block, MemoryAsContext, MemoryAsGate, MemoryAsLayer
from titans_lnn.cells import CfCCell, LTCCell
from titans_lnn.config import PRESETS, VARIANTS, TitansLNNConfig
from titans_lnn.liquid import LiquidCore
from titans_lnn.memory import NeuralMemory, PersistentMemory
from titans_lnn.model import ModelOutput, StreamPiece, TitansLNN
from titans_lnn.state import ModelState

__version__ = "0.1.0"

__all__ = [
    "MIXERS", "PRESETS", "VARIANTS", "Block", "CfCCell", "LTCCell", "LiquidCore", "MemoryAsContext", "MemoryAsGate",
    "MemoryAsLayer", "ModelOutput", "ModelState", "NeuralMemory", "PersistentMemory", "SlidingWindowAttention",
    "StreamPiece", "TitansLNN", "TitansLNNConfig", "__version__",
]
