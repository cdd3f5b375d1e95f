"""The ``quantization_config`` dictionary of an SDNQ checkpoint, and per-layer option resolution.

:class:`QuantConfig` reads the JSON dict any sdnq release wrote (absent fields take *that release's*
defaults, unknown fields are kept), and :meth:`QuantConfig.options_for` decides, for one parameter name,
whether the layer is quantized and with which :class:`LayerOptions` (``docs/format-spec.md`` §5).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

from . import history
from .dtypes import get_dtype
from .errors import SDNQConfigError
from .layout import LayerKind, LayerOptions

QUANT_METHODS = ("sdnq", "sdnq_training")
_INTERNAL = ("extra", "writer_versions")

_LIST_FIELDS = ("modules_to_not_convert", "modules_to_not_use_matmul")
_DICT_FIELDS = ("modules_dtype_dict", "modules_quant_config")


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'0.2.8' → (0, 2, 8); None or garbage → None."""
    if not text:
        return None
    nums = re.findall(r"\d+", str(text))
    return tuple(int(n) for n in nums[:3]) if nums else None


@dataclass
class QuantConfig:
    """A parsed SDNQ ``quantization_config``. Field names and meanings are the reference's."""

    weights_dtype: str = "int8"
    scale_dtype: str | None = None
    zero_point_dtype: str | None = None
    quantized_matmul_dtype: str | None = None
    hadamard_group_size: int = 256
    group_size: int = 0
    svd_rank: int = 32
    svd_steps: int = 8
    codebook_steps: int = 24
    dynamic_loss_threshold: float | None = None
    use_svd: bool = False
    use_hadamard: bool = False
    use_codebook: bool = False
    use_codebook_scale: bool = False
    use_grad_ckpt: bool = True
    quant_conv: bool = False
    quant_embedding: bool = False
    use_quantized_matmul: bool = False
    use_quantized_matmul_conv: bool = False
    use_static_quantization: bool = True
    use_dynamic_quantization: bool = False
    use_stochastic_rounding: bool = False
    dequantize_fp32: bool = True
    non_blocking: bool = False
    add_skip_keys: bool = True
    minimum_allowed_numel: int = 16384
    minimum_allowed_channel_size: int = 32
    modules_to_not_convert: list[str] = field(default_factory=list)
    modules_to_not_use_matmul: list[str] = field(default_factory=list)
    modules_dtype_dict: dict[str, list[str]] = field(default_factory=dict)
    modules_quant_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantization_device: str | None = None
    return_device: str | None = None
    sdnq_version: str | None = None
    is_training: bool = False
    quant_method: str = "sdnq"
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields this version of diffusers-sdnq does not know; kept so a round trip loses nothing."""
    writer_versions: tuple[tuple[int, ...], ...] = field(default=(), repr=False, compare=False)
    """The sdnq releases that may have written this config: the one ``sdnq_version`` names, else those its fields
    allow (``history.writer_candidates``). Not serialized."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "quantization_config") -> QuantConfig:
        """Parse a config dict. Absent fields get the defaults of the sdnq version that wrote it."""
        if not isinstance(data, Mapping):
            raise SDNQConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - set(_INTERNAL)
        derived = {"is_integer", "is_unsigned"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k not in derived}
        method = values.get("quant_method", "sdnq")
        method = getattr(method, "value", method)
        if method not in QUANT_METHODS:
            raise SDNQConfigError(f"{source}: quant_method is {method!r}, expected one of {QUANT_METHODS}")
        values["quant_method"] = method
        version = parse_version(values.get("sdnq_version"))
        candidates = (version,) if version else history.writer_candidates(data)
        rules = history.readings(version or history.best_guess(candidates, data))
        # An absent field means the default of the release that wrote the file, not ours.
        values.setdefault("dequantize_fp32", rules.dequantize_fp32_default)
        values.setdefault("hadamard_group_size", rules.hadamard_group_size_default)
        values.setdefault("dynamic_loss_threshold", rules.dynamic_loss_threshold_default)
        for name in ("quantization_device", "return_device"):  # torch.device / GPU index given in Python
            device = values.get(name)
            if isinstance(device, int) and not isinstance(device, bool):
                values[name] = f"cuda:{device}"
            elif device is not None and not isinstance(device, str):
                values[name] = str(device)
        for name in ("scale_dtype", "zero_point_dtype", "quantized_matmul_dtype"):
            if isinstance(values.get(name), str) and values[name].strip().lower() in ("", "none", "null"):
                values[name] = None  # the reference accepts the string "none" for "not set"
        for name in _LIST_FIELDS:
            if values.get(name) is None:
                values[name] = []
            elif isinstance(values[name], str):
                values[name] = [values[name]]
            elif not isinstance(values[name], (list, tuple)):
                raise SDNQConfigError(f"{source}: {name} must be a list of names, got {values[name]!r}")
            values[name] = [str(v) for v in values[name]]
        for name in _DICT_FIELDS:
            if values.get(name) is None:
                values[name] = {}
            elif not isinstance(values[name], Mapping):
                raise SDNQConfigError(f"{source}: {name} must be a JSON object, got {values[name]!r}")
            values[name] = dict(values[name])
        config = cls(**values, extra=extra, writer_versions=candidates)
        config.validate(source)
        return config

    def validate(self, source: str = "quantization_config") -> None:
        """Check every dtype name and numeric field now, so a bad config fails before any weight is read."""
        get_dtype(self.weights_dtype, what=f"{source}.weights_dtype")
        for name in ("scale_dtype", "zero_point_dtype", "quantized_matmul_dtype"):
            value = getattr(self, name)
            if value is not None:
                get_dtype(value, what=f"{source}.{name}")
        for key in self.modules_dtype_dict:
            if _min_bits_key(key) is None:
                get_dtype(key, what=f"{source}.modules_dtype_dict key")
            if not isinstance(self.modules_dtype_dict[key], (list, tuple)):
                raise SDNQConfigError(f"{source}.modules_dtype_dict[{key!r}] must be a list of module names")
        for pattern, overrides in self.modules_quant_config.items():
            if not isinstance(overrides, Mapping):
                raise SDNQConfigError(f"{source}.modules_quant_config[{pattern!r}] must be an object")
            if "weights_dtype" in overrides:
                get_dtype(overrides["weights_dtype"], what=f"{source}.modules_quant_config[{pattern!r}].weights_dtype")
        if not isinstance(self.group_size, int) or self.group_size < -2:
            raise SDNQConfigError(f"{source}.group_size must be an int ≥ -2, got {self.group_size!r}")
        if self.use_svd and (not isinstance(self.svd_rank, int) or self.svd_rank < 1):
            raise SDNQConfigError(f"{source}.svd_rank must be a positive int when use_svd, got {self.svd_rank!r}")
        if self.extra:
            _warn_unknown_fields(tuple(sorted(self.extra)), source)

    def to_dict(self) -> dict[str, Any]:
        """The JSON dict, in the reference's field names (unknown fields put back)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _INTERNAL}
        out.update(self.extra)
        dt = get_dtype(self.weights_dtype)
        out["is_integer"] = dt.is_integer
        out["is_unsigned"] = dt.unsigned
        return out

    # ------------------------------------------------------------------ per-layer decisions
    @property
    def version(self) -> tuple[int, ...]:
        """The release whose rules decode this checkpoint: ``sdnq_version``, else the likeliest writer."""
        return parse_version(self.sdnq_version) or history.best_guess(self.candidates, {
            "hadamard_group_size": self.hadamard_group_size, "dequantize_fp32": self.dequantize_fp32,
            "dynamic_loss_threshold": self.dynamic_loss_threshold})

    @property
    def version_known(self) -> bool:
        """True when ``sdnq_version`` names the writing release (every release writes it)."""
        return parse_version(self.sdnq_version) is not None

    @property
    def candidates(self) -> tuple[tuple[int, ...], ...]:
        return self.writer_versions or (history.LATEST,)

    def is_skipped(self, param_name: str) -> bool:
        """True when ``param_name`` (e.g. ``blocks.0.attn.to_q.weight``) matches modules_to_not_convert."""
        return match_any(param_name, self.modules_to_not_convert) is not None

    def quantizes_kind(self, kind: LayerKind) -> bool:
        if kind in ("conv", "conv_transpose"):
            return self.quant_conv
        if kind == "embedding":
            return self.quant_embedding
        return True

    def options_for(self, param_name: str, kind: LayerKind, *, version: tuple[int, ...] | None = None
                    ) -> LayerOptions:
        """Resolve the options of one layer: global fields, then modules_quant_config, dtype dict, no-matmul, then
        what the writing release (``version``, default :attr:`version`) did differently."""
        opts: dict[str, Any] = {
            "weights_dtype": self.weights_dtype,
            "group_size": self.group_size,
            "use_svd": self.use_svd,
            "svd_rank": self.svd_rank,
            "use_hadamard": self.use_hadamard,
            "hadamard_group_size": self.hadamard_group_size,
            "use_codebook": self.use_codebook,
            "use_quantized_matmul": self.use_quantized_matmul_conv if kind == "conv" else self.use_quantized_matmul,
            "quantized_matmul_dtype": self.quantized_matmul_dtype,
            "scale_dtype": self.scale_dtype,
            "zero_point_dtype": self.zero_point_dtype,
            "use_codebook_scale": self.use_codebook_scale,
            "dequantize_fp32": self.dequantize_fp32,
        }
        hit = match_any(param_name, list(self.modules_quant_config))
        if hit is not None:
            for key, value in self.modules_quant_config[hit].items():
                if key == "use_quantized_matmul_conv" and kind == "conv" or key in opts and key != "use_quantized_matmul_conv":
                    opts["use_quantized_matmul" if key == "use_quantized_matmul_conv" else key] = value
        for key, patterns in self.modules_dtype_dict.items():
            if match_any(param_name, list(patterns)) is None:
                continue
            min_bits = _min_bits_key(key)
            if min_bits is None:
                opts["weights_dtype"] = key
            else:
                bits, want_uint = min_bits
                current = get_dtype(opts["weights_dtype"])
                if current.bits < bits:
                    opts["weights_dtype"] = f"{'uint' if want_uint or bits <= 4 else 'int'}{bits}"
            break
        excluded = match_any(param_name, self.modules_to_not_use_matmul)
        if excluded is not None:
            opts["use_quantized_matmul"] = False
            opts["matmul_excluded_by"] = f"modules_to_not_use_matmul pattern {excluded!r}"
        elif hit is not None and self.modules_quant_config[hit].get(
                "use_quantized_matmul_conv" if kind == "conv" else "use_quantized_matmul") is False:
            opts["matmul_excluded_by"] = f"modules_quant_config pattern {hit!r}"
        return LayerOptions(**history.apply_readings(opts, kind, version or self.version))

    def replace(self, **changes: Any) -> QuantConfig:
        return replace(self, **changes)


def _min_bits_key(key: str) -> tuple[int, bool] | None:
    """'minimum_6bit' → (6, False); 'minimum_uint4bit' → (4, True); '8bit' → (8, False); else None."""
    low = key.lower()
    if not (low.startswith("minimum") or low.endswith("bit") or low.endswith("bits")):
        return None
    digits = re.findall(r"\d+", low)
    if not digits:
        raise SDNQConfigError(f"modules_dtype_dict key {key!r} looks like a minimum-bits key but has no number")
    return int(digits[-1]), "uint" in low


@lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    text = pattern.replace(".*", "\0")
    text = text.replace("*", ".*").replace("\0", "\\..*")
    return re.compile(text)


def name_matches(name: str, pattern: str) -> bool:
    """SDNQ's name matching (``docs/format-spec.md`` §5.3)."""
    if pattern.startswith("."):
        return name.startswith(pattern[1:])
    if pattern == name or pattern in name.split("."):
        return True
    if "*" in pattern:
        try:
            return _pattern_regex(pattern).match(name) is not None
        except re.error:
            return False
    return False


def match_any(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches ``name`` (lists are scanned in order), or None."""
    for pattern in patterns:
        if name_matches(name, pattern):
            return pattern
    return None


_warned: set[tuple[str, ...]] = set()


def _warn_unknown_fields(names: tuple[str, ...], source: str) -> None:
    if names in _warned:
        return
    _warned.add(names)
    warnings.warn(
        f"{source} has fields diffusers-sdnq does not know: {', '.join(names)}. They are kept (and written back "
        "on save) but have no effect; if the checkpoint was made by a newer sdnq, check for a newer diffusers-sdnq.",
        UserWarning,
        stacklevel=3,
    )
