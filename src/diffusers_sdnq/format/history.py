"""What changed between sdnq releases, as far as reading a checkpoint is concerned (``docs/format-history.md``).

Every release writes its whole config, ``sdnq_version`` included (from 0.1.0 on), so the writing release is
normally known. When it is not (a config edited by hand, or written by another tool), :func:`writer_candidates`
narrows it down from the fields present and absent, and :func:`resolve_layout` lets the stored tensors' shapes
decide between the layouts the candidates would have written, warning where the files cannot tell.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from .errors import SDNQConfigError, SDNQFormatError, SDNQFormatVersionWarning, SDNQShapeError
from .layout import LayerKind, LayerLayout, LayerOptions, check_stored, plan_layer

if TYPE_CHECKING:
    from .config import QuantConfig

Version = tuple[int, ...]

RELEASES: tuple[Version, ...] = tuple(
    (0, 1, n) for n in range(10)) + tuple((0, 2, n) for n in range(9))
"""Every sdnq release on PyPI, oldest first (0.1.0 of 2025-11 to 0.2.8 of 2026-10)."""

LATEST: Version = RELEASES[-1]

FIELD_SINCE: dict[str, Version] = {
    "use_dynamic_quantization": (0, 1, 3),
    "dynamic_loss_threshold": (0, 1, 3),
    "modules_quant_config": (0, 1, 5),
    "quant_embedding": (0, 1, 7),
    "use_hadamard": (0, 1, 9),
    "hadamard_group_size": (0, 1, 9),
    "modules_to_not_use_matmul": (0, 1, 9),
    "minimum_allowed_numel": (0, 2, 2),
    "minimum_allowed_channel_size": (0, 2, 4),
    "use_codebook": (0, 2, 5),
    "codebook_steps": (0, 2, 5),
    "is_unsigned": (0, 2, 5),
    "scale_dtype": (0, 2, 8),
    "zero_point_dtype": (0, 2, 8),
    "use_codebook_scale": (0, 2, 8),
}
"""The first release whose saved config holds each field (measured on files each release wrote). Fields not listed
are written by every release."""


def version_str(version: Iterable[int]) -> str:
    return ".".join(str(n) for n in version)


def writer_candidates(data: Mapping[str, Any]) -> tuple[Version, ...]:
    """The releases that could have written a config dict without ``sdnq_version``, oldest first.

    A release writes every field it knows, so a present field rules out older releases and an absent one newer
    ones. Contradictory dicts (a field of 0.2.8 but none of 0.2.2's) keep the releases the present fields allow.
    """
    low = max((since for name, since in FIELD_SINCE.items() if name in data), default=RELEASES[0])
    high = min((since for name, since in FIELD_SINCE.items() if name not in data and since > low), default=None)
    found = tuple(v for v in RELEASES if v >= low and (high is None or v < high))
    return found or tuple(v for v in RELEASES if v >= low) or (LATEST,)


def best_guess(candidates: tuple[Version, ...], data: Mapping[str, Any]) -> Version:
    """The likeliest writer among the candidates: the newest of those whose defaults match the most of the values
    in ``data`` (users rarely change these, so a value equal to one release's default points at that release)."""
    def matches(version: Version) -> int:
        rules = readings(version)
        score = 0
        if "dequantize_fp32" in data:
            score += data["dequantize_fp32"] == rules.dequantize_fp32_default
        if "hadamard_group_size" in data:
            score += data["hadamard_group_size"] == rules.hadamard_group_size_default
        if "dynamic_loss_threshold" in data:
            score += data["dynamic_loss_threshold"] == rules.dynamic_loss_threshold_default
        return score

    best = max(matches(v) for v in candidates)
    return [v for v in candidates if matches(v) == best][-1]


@dataclass(frozen=True)
class Readings:
    """How a release wrote and read the parts of a layer that changed over time (see docs/format-history.md)."""

    hadamard: bool | str
    floats: bool | str
    uint_matmul: bool
    tensorwise_groups: bool
    low_bit_conv_as_uint4: bool
    packed_matmul_transposed: bool
    conv_transpose_dim0_groups: bool
    dequantize_fp32_default: bool
    hadamard_group_size_default: int
    dynamic_loss_threshold_default: float | None


def readings(version: Version | None) -> Readings:
    """The reading rules of one release (the newest's for None or a version newer than any we know)."""
    v = tuple(version) if version else LATEST
    return Readings(
        hadamard=True if v < (0, 2, 0) else "0.2.1" if v[:3] == (0, 2, 1) else False,
        floats="0.1.3" if v < (0, 1, 6) else "0.1.6" if v < (0, 2, 2) else False,
        uint_matmul=v >= (0, 2, 2),
        tensorwise_groups=v >= (0, 2, 5),
        low_bit_conv_as_uint4=v < (0, 1, 3),
        packed_matmul_transposed=v < (0, 1, 4),
        conv_transpose_dim0_groups=v < (0, 1, 9),
        dequantize_fp32_default=v >= (0, 1, 6),
        hadamard_group_size_default=128 if v < (0, 2, 0) else 256,
        dynamic_loss_threshold_default=0.01 if v < (0, 1, 7) else None,
    )


def apply_readings(opts: dict[str, Any], kind: LayerKind, version: Version | None) -> dict[str, Any]:
    """Adjust resolved per-layer options to what the writing release did with them."""
    from .dtypes import get_dtype

    rules = readings(version)
    opts["hadamard_legacy"] = rules.hadamard
    opts["legacy_float_subnormals"] = rules.floats
    opts["uint_matmul"] = rules.uint_matmul
    opts["legacy_packed_matmul"] = rules.packed_matmul_transposed
    opts["legacy_conv_transpose_groups"] = rules.conv_transpose_dim0_groups
    if not rules.tensorwise_groups and opts["group_size"] < -1:
        opts["group_size"] = -1  # one scale per tensor arrived in 0.2.5; before, any negative size meant per row
    if rules.low_bit_conv_as_uint4 and kind in ("conv", "conv_transpose") and get_dtype(opts["weights_dtype"]).bits < 4:
        opts["weights_dtype"] = "uint4"  # 0.1.0-0.1.2 quantized convolutions to at least uint4
    return opts


# ------------------------------------------------------------------------------------------------ evidence
def resolve_layout(config: QuantConfig, param: str, kind: LayerKind, shape: tuple[int, ...],
                   stored: Mapping[str, torch.Tensor | tuple[tuple[int, ...], torch.dtype]], *, prefix: str = "",
                   source: str | None = None, notes: list[str] | None = None) -> LayerLayout:
    """Plan one layer from its config and check it against its stored tensors, letting the files decide where the
    config is not enough.

    Two things can leave the config short: no ``sdnq_version`` (several releases fit its fields, and they wrote some
    layers differently), and sdnq 0.1.x's ``sdnq_post_load_quant`` dropping ``quantized_matmul_dtype`` from the
    saved config (the layer was stored for a float matmul, not transposed, while the config then implies an int8
    one). The layout whose shapes and dtypes fit the stored tensors wins; a note says so. Where several releases fit
    and would decode differently, the likeliest is used and a note says the result may be wrong. Notes go to
    ``notes`` when given (the caller warns once for a whole model), else are warned here.
    """
    opts = config.options_for(param, kind)
    name = f"{prefix.rstrip('.')}" or param
    where = f" in {source}" if source else ""
    alternatives: list[tuple[str, LayerOptions]] = []
    if not config.version_known:
        alternatives += [(f"sdnq {version_str(v)}", config.options_for(param, kind, version=v))
                         for v in config.writer_versions if v != config.version]
    if opts.use_quantized_matmul:
        alternatives.append(("a layer stored without the quantized-matmul layout (sdnq 0.1.x leaves "
                             "quantized_matmul_dtype out of the saved config)", replace(opts, use_quantized_matmul=False)))
    primary: LayerLayout | None = None
    fitted: LayerLayout | None = None
    try:
        primary = plan_layer(kind, shape, opts)
        fitted = check_stored(primary, stored, prefix=prefix, source=source)
        error: SDNQFormatError | None = None
    except (SDNQShapeError, SDNQConfigError) as exc:
        error = exc
    fits: list[tuple[str, LayerLayout]] = []
    for label, alt in alternatives:
        try:
            layout = plan_layer(kind, shape, alt)
            if layout == primary:
                continue
            layout = check_stored(layout, stored, prefix=prefix, source=source)
        except (SDNQShapeError, SDNQConfigError):
            continue
        if all(layout != other for _, other in fits) and layout != fitted:
            fits.append((label, layout))
    guess = version_str(config.version)
    if fitted is not None:
        rivals = [label for label, _ in fits if label.startswith("sdnq ")]
        if rivals:
            _note(notes, f"'{name}'{where}: the config has no sdnq_version; sdnq {guess} (assumed) and "
                         f"{', '.join(rivals)} would decode this layer differently and its tensors fit both; decoded "
                         f"as sdnq {guess} wrote it. Add \"sdnq_version\" to the config if that is wrong.")
        return fitted
    if not fits:
        assert error is not None
        raise error
    label, layout = fits[0]
    others = f" (also fits: {'; '.join(lbl for lbl, _ in fits[1:])})" if len(fits) > 1 else ""
    _note(notes, f"'{name}'{where}: the stored tensors do not fit the layout the config describes (sdnq {guess}), "
                 f"but fit {label}; decoded that way{others}.")
    return layout


def _note(notes: list[str] | None, message: str) -> None:
    if notes is not None:
        notes.append(message)
    else:
        warnings.warn(message, SDNQFormatVersionWarning, stacklevel=3)


def warn_notes(notes: list[str], what: str) -> None:
    """One warning for all the notes :func:`resolve_layout` collected while loading ``what``."""
    if not notes:
        return
    shown = "\n  - ".join(notes[:8])
    more = f"\n  ... and {len(notes) - 8} more" if len(notes) > 8 else ""
    warnings.warn(f"{what}: {len(notes)} layer(s) needed the stored tensors to decide their layout:\n  - {shown}{more}",
                  SDNQFormatVersionWarning, stacklevel=3)
