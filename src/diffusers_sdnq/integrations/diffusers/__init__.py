"""diffusers integration: ``SDNQDiffusersConfig``, ``SDNQDiffusersQuantizer`` and ``register()``."""

from .config import SDNQDiffusersConfig
from .quantizer import SDNQDiffusersQuantizer
from .register import register

__all__ = ["SDNQDiffusersConfig", "SDNQDiffusersQuantizer", "register"]
