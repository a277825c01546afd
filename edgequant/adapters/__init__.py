"""One adapter per architecture family, registered by name (see :mod:`.base`)."""

from . import gemma, llama, mamba2, phi3, qwen  # noqa: F401  (importing a family registers it)
from .base import Adapter, BlockShape, Group, adapter, adapter_for_gguf, adapter_of, head_dim, supported

__all__ = ["Adapter", "BlockShape", "Group", "adapter", "adapter_for_gguf", "adapter_of", "head_dim", "supported"]
