"""Drop-in adapters that expose TokenSpeed ops under other libraries' Python APIs.

``flash_mla``: ``get_mla_metadata`` / ``flash_mla_with_kvcache`` with FlashMLA's call
shapes, backed by ``torch.ops.tokenspeed.mla_decode`` (any device the op supports).
"""

from tokenspeed_kernels.adapters.flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata

__all__ = ["FlashMLASchedMeta", "flash_mla_with_kvcache", "get_mla_metadata"]
