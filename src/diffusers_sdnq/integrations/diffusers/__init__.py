"""diffusers integration: ``SDNQDiffusersConfig``, ``SDNQDiffusersQuantizer`` and ``register()``."""

from ..hooks import retry_pending
from .config import SDNQDiffusersConfig
from .quantizer import SDNQDiffusersQuantizer
from .register import register

__all__ = ["SDNQDiffusersConfig", "SDNQDiffusersQuantizer", "register"]

retry_pending(__name__)  # a library import that finished while this package was importing
