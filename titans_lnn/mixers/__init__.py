"""The seed architectures as sequence mixers, each usable on its own from keyword arguments, with a
per-token reference, a chunked form and a fixed-size streaming state (``init_state``):

| mixer | module | variant |
|---|---|---|
| ``Mamba2`` (SSD) | ``mamba2`` | mamba2 |
| ``Based`` (``GatedShortConv`` + ``TaylorLinearAttention`` + sliding window) | ``based`` | based |
| ``Lfm2`` (``GatedShortConv`` + grouped-query attention) | ``lfm2`` | lfm2 |
| ``GatedDeltaNet`` | ``gated_delta`` | gdn |
"""

from titans_lnn.mixers.based import Based, TaylorLinearAttention
from titans_lnn.mixers.gated_delta import GatedDeltaNet
from titans_lnn.mixers.lfm2 import Lfm2
from titans_lnn.mixers.mamba2 import Mamba2
from titans_lnn.mixers.short_conv import GatedShortConv

__all__ = ["Based", "GatedDeltaNet", "GatedShortConv", "Lfm2", "Mamba2", "TaylorLinearAttention"]
