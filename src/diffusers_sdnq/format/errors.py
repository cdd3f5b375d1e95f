"""Error types of the codec. All are ``ValueError`` subclasses so callers can catch broadly."""

from __future__ import annotations


class SDNQFormatError(ValueError):
    """A checkpoint's tensors or config do not fit the SDNQ format. The message names the tensor."""


class SDNQDtypeError(SDNQFormatError):
    """An unknown or unsupported dtype name."""


class SDNQShapeError(SDNQFormatError):
    """A stored tensor has the wrong shape, dtype or byte count for its layer."""


class SDNQConfigError(SDNQFormatError):
    """A quantization_config field is invalid or contradicts the files."""


class SDNQWarning(UserWarning):
    """Something in a checkpoint is suspicious but loadable; the message says what and where."""


class SDNQNonFiniteWarning(SDNQWarning):
    """A scale, zero point or SVD factor holds NaN or Inf: every weight it touches will be NaN/Inf."""


class SDNQUnusedPatternWarning(SDNQWarning):
    """A name in modules_dtype_dict / modules_quant_config / modules_to_not_convert matches no layer."""


class SDNQFormatVersionWarning(SDNQWarning):
    """The writing sdnq release is unknown or the config and the stored tensors disagree about a layer's layout;
    the tensors decided. The message names the layer and the reading used."""
