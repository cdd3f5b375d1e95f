"""Load pre-quantized SDNQ checkpoints with ``transformers`` (``AutoModel*.from_pretrained``).

Call :func:`register` once before ``from_pretrained``; it points transformers' ``"sdnq"`` and
``"sdnq_training"`` quantization methods at :class:`SDNQHfQuantizer` / :class:`SDNQTransformersConfig`.
"""

from ..hooks import retry_pending
from .config import SDNQTransformersConfig
from .quantizer import SDNQHfQuantizer
from .register import is_registered, register

__all__ = ["SDNQHfQuantizer", "SDNQTransformersConfig", "is_registered", "register"]

retry_pending(__name__)  # a library import that finished while this package was importing
