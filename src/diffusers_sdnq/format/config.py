"""The ``quantization_config`` dictionary of an SDNQ checkpoint, and per-layer option resolution.

:class:`QuantConfig` reads the JSON dict any sdnq release wrote (absent fields take *that release's*
defaults, unknown fields are kept), and :meth:`QuantConfig.options_for` decides, for one parameter name,
whether the layer is quantized and with which :class:`LayerOptions` (``docs/format-spec.md`` §5).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import history
from .dtypes import get_dtype
from .errors import SDNQConfigError, SDNQUnusedPatternWarning
from .layout import LayerKind, LayerOptions
from .patterns import PatternError, PatternSet

QUANT_METHODS = ("sdnq", "sdnq_training")
_INTERNAL = ("extra", "writer_versions")

_LIST_FIELDS = ("modules_to_not_convert", "modules_to_not_use_matmul")
_DICT_FIELDS = ("modules_dtype_dict", "modules_quant_config")
PATTERN_FIELDS = ("modules_to_not_convert", "modules_dtype_dict", "modules_quant_config", "modules_to_not_use_matmul")
"""The fields that hold layer-name patterns (``docs/format-spec.md`` §5.3)."""

_INT_FIELDS = ("hadamard_group_size", "group_size", "svd_rank", "svd_steps", "codebook_steps",
               "minimum_allowed_numel", "minimum_allowed_channel_size")
_BOOL_FIELDS = ("use_svd", "use_hadamard", "use_codebook", "use_codebook_scale", "use_grad_ckpt", "quant_conv",
                "quant_embedding", "use_quantized_matmul", "use_quantized_matmul_conv", "use_static_quantization",
                "use_dynamic_quantization", "use_stochastic_rounding", "dequantize_fp32", "non_blocking",
                "add_skip_keys", "is_training")
_DTYPE_FIELDS = ("weights_dtype", "scale_dtype", "zero_point_dtype", "quantized_matmul_dtype")
MAX_NESTING = 32
"""Deepest nesting of lists/objects accepted inside a config (real configs nest 3 levels); deeper values would
only overflow the stack of whatever copies or prints them later."""


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
                raise SDNQConfigError(f"{source}: {name} must be a list of layer names, got {_short(values[name])}")
            values[name] = list(values[name])
        for name in _DICT_FIELDS:
            if values.get(name) is None:
                values[name] = {}
            elif not isinstance(values[name], Mapping):
                raise SDNQConfigError(f"{source}: {name} must be a JSON object, got {_short(values[name])}")
            values[name] = dict(values[name])
        for name, value in values.items():
            values[name] = _checked_value(name, value, f"{source}: {name}")
        for name, value in extra.items():
            _check_nesting(value, f"{source}: {name}")
        config = cls(**values, extra=extra, writer_versions=candidates)
        config.validate(source)
        return config

    def validate(self, source: str = "quantization_config") -> None:
        """Check every field's type, dtype name, number and pattern now, so a bad config fails before any weight
        is read, with an error naming ``source`` and the field."""
        for name in (*_INT_FIELDS, *_BOOL_FIELDS, *_DTYPE_FIELDS, "dynamic_loss_threshold", "sdnq_version"):
            _checked_value(name, getattr(self, name), f"{source}: {name}")
        get_dtype(self.weights_dtype, what=f"{source}.weights_dtype")
        for name in ("scale_dtype", "zero_point_dtype", "quantized_matmul_dtype"):
            value = getattr(self, name)
            if value is not None:
                get_dtype(value, what=f"{source}.{name}")
        for key, patterns in self.modules_dtype_dict.items():
            if not isinstance(key, str):
                raise SDNQConfigError(f"{source}: modules_dtype_dict key {key!r} must be a dtype name string")
            if _min_bits_key(key, source) is None:
                get_dtype(key, what=f"{source}.modules_dtype_dict key")
            if not isinstance(patterns, (list, tuple)):
                raise SDNQConfigError(f"{source}: modules_dtype_dict[{key!r}] must be a list of layer names, got "
                                      f"{_short(patterns)}")
        for pattern, overrides in self.modules_quant_config.items():
            where = f"{source}: modules_quant_config[{pattern!r}]"
            if not isinstance(overrides, Mapping):
                raise SDNQConfigError(f"{where} must be an object of quantization options, got {_short(overrides)}")
            for key, value in overrides.items():
                _checked_value(key, value, f"{where}.{key}")
                if key in _DTYPE_FIELDS and value is not None:
                    get_dtype(value, what=f"{where}.{key}")
            unknown = sorted(str(k) for k in overrides if k not in _OVERRIDABLE)
            if unknown:
                _warn_unknown_fields(tuple(unknown), where)
        if self.group_size < -2:
            raise SDNQConfigError(f"{source}: group_size must be an int ≥ -2, got {self.group_size!r}")
        if self.use_svd and self.svd_rank < 1:
            raise SDNQConfigError(f"{source}: svd_rank must be a positive int when use_svd, got {self.svd_rank!r}")
        if self.use_hadamard and self.hadamard_group_size < 1:
            raise SDNQConfigError(f"{source}: hadamard_group_size must be a positive int, got "
                                  f"{self.hadamard_group_size!r}")
        self._compile_patterns(source)
        if self.extra:
            _warn_unknown_fields(tuple(sorted(self.extra)), source)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle and deepcopy the fields only: compiled patterns are rebuilt on demand."""
        return {k: v for k, v in self.__dict__.items() if k != "_pattern_cache"}

    def _compile_patterns(self, source: str) -> None:
        """Compile every pattern field once (an invalid pattern is an error naming the field)."""
        for field_name in PATTERN_FIELDS:
            self._pattern_sets(field_name, source)

    def _pattern_sets(self, field_name: str, source: str = "quantization_config") -> dict[Any, PatternSet]:
        """{key: compiled patterns} of one field (key None for the two list fields), cached on the config and
        rebuilt (or extended, for a list that only grew) when the field changed."""
        cache: dict[str, tuple[Any, dict[Any, PatternSet]]] = self.__dict__.setdefault("_pattern_cache", {})
        value = getattr(self, field_name)
        if field_name == "modules_dtype_dict":
            lists = {key: list(pats) if isinstance(pats, (list, tuple)) else pats for key, pats in value.items()}
        elif field_name == "modules_quant_config":
            lists = {None: list(value)}
        else:
            lists = {None: value}
        hit = cache.get(field_name)
        if hit is not None and hit[0].keys() == lists.keys():
            sets = hit[1]
            if all(sets[k].patterns == v for k, v in lists.items()):
                return sets
            grown = all(len(v) >= len(sets[k]) and v[:len(sets[k])] == sets[k].patterns for k, v in lists.items())
            if grown:  # the writer appends skipped layers one at a time: compile only the new ones
                for key, patterns in lists.items():
                    self._extend(sets[key], patterns[len(sets[key]):], field_name, key, source)
                cache[field_name] = ({k: None for k in lists}, sets)
                return sets
        sets = {}
        for key, patterns in lists.items():
            sets[key] = PatternSet(module_names=field_name == "modules_to_not_convert")
            self._extend(sets[key], patterns, field_name, key, source)
        cache[field_name] = ({k: None for k in lists}, sets)
        return sets

    @staticmethod
    def _extend(target: PatternSet, patterns: list, field_name: str, key: Any, source: str) -> None:
        try:
            target.extend(patterns)
        except PatternError as exc:
            where = field_name if key is None else f"{field_name}[{key!r}]"
            raise SDNQConfigError(f"{source}: {where}: {exc}") from None

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

    def is_skipped(self, param_name: str, *, reference_only: bool = False) -> bool:
        """True when ``param_name`` (e.g. ``blocks.0.attn.to_q.weight``) matches modules_to_not_convert.

        Besides the format's rules, a module name matches its layers as in transformers (``blocks.0.attn.to_q``,
        a parent ``blocks.0`` or a suffix ``attn.to_q``); ``reference_only`` leaves that out (what the reference,
        which reads the saved config too, would decide)."""
        return self._pattern_sets("modules_to_not_convert")[None].matches(param_name, reference_only=reference_only)

    def unused_patterns(self, names: Iterable[str], *, exact_only: bool = False,
                        ignore: Container[str] = ()) -> list[str]:
        """Entries of the pattern fields that match none of ``names`` (full parameter names), as
        ``"field: 'pattern'"``. ``exact_only``: only entries that name one layer exactly (wildcards, single words
        and root prefixes in a saved config may legitimately match nothing in one component of a pipeline).
        ``ignore``: patterns never reported (e.g. the writer's own default skip keys)."""
        names = list(names)
        out = []
        for field_name in PATTERN_FIELDS:
            for key, patterns in self._pattern_sets(field_name).items():
                label = field_name if key is None else f"{field_name}[{key!r}]"
                for index in patterns.unused(names, exact_only=exact_only):
                    pattern = patterns.patterns[index]
                    if pattern in ignore:
                        continue
                    hint = (f" (did you mean {pattern + '.weight'!r}? this field matches full parameter names)"
                            if not patterns.module_names and f"{pattern}.weight" in names else "")
                    out.append(f"{label}: {pattern!r}{hint}")
        return out

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
        index = self._pattern_sets("modules_quant_config")[None].first(param_name)
        hit = None if index is None else list(self.modules_quant_config)[index]
        if hit is not None:
            for key, value in self.modules_quant_config[hit].items():
                if key == "use_quantized_matmul_conv" and kind == "conv" or key in opts and key != "use_quantized_matmul_conv":
                    opts["use_quantized_matmul" if key == "use_quantized_matmul_conv" else key] = value
        dtype_sets = self._pattern_sets("modules_dtype_dict")
        for key in self.modules_dtype_dict:
            if not dtype_sets[key].matches(param_name):
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
        excluded = self._pattern_sets("modules_to_not_use_matmul")[None].first(param_name)
        if excluded is not None:
            opts["use_quantized_matmul"] = False
            opts["matmul_excluded_by"] = \
                f"modules_to_not_use_matmul pattern {self.modules_to_not_use_matmul[excluded]!r}"
        elif hit is not None and self.modules_quant_config[hit].get(
                "use_quantized_matmul_conv" if kind == "conv" else "use_quantized_matmul") is False:
            opts["matmul_excluded_by"] = f"modules_quant_config pattern {hit!r}"
        return LayerOptions(**history.apply_readings(opts, kind, version or self.version))

    def replace(self, **changes: Any) -> QuantConfig:
        return replace(self, **changes)


def _min_bits_key(key: str, source: str = "quantization_config") -> tuple[int, bool] | None:
    """'minimum_6bit' → (6, False); 'minimum_uint4bit' → (4, True); '8bit' → (8, False); else None."""
    low = key.lower()
    if not (low.startswith("minimum") or low.endswith("bit") or low.endswith("bits")):
        return None
    digits = re.findall(r"\d+", low)
    if not digits or not 1 <= int(digits[-1]) <= 16:
        raise SDNQConfigError(f"{source}: modules_dtype_dict key {key!r} looks like a minimum-bits key but has no "
                              "bit count between 1 and 16")
    return int(digits[-1]), "uint" in low


def name_matches(name: str, pattern: str) -> bool:
    """SDNQ's name matching (``docs/format-spec.md`` §5.3), for one pattern. Prefer :class:`QuantConfig`'s
    methods, which compile each field once."""
    return PatternSet([pattern]).matches(name)


def match_any(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches ``name`` (lists are scanned in order), or None."""
    patterns = list(patterns)
    index = PatternSet(patterns).first(name)
    return None if index is None else patterns[index]


_OVERRIDABLE = frozenset(f.name for f in fields(QuantConfig)) - {"extra", "writer_versions", "quant_method",
                                                                  *_LIST_FIELDS, *_DICT_FIELDS}
"""Keys a ``modules_quant_config`` entry may set (others are kept and warned about)."""


def _short(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"


def _checked_value(name: str, value: Any, where: str) -> Any:
    """``value`` of field ``name`` if its type is right (bools given as 0/1 become bools), else SDNQConfigError
    naming ``where``. Fields without a fixed type are only checked for depth."""
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SDNQConfigError(f"{where} must be an integer, got {_short(value)}")
    elif name in _BOOL_FIELDS:
        if value is None:
            return False  # what the reference's truth test makes of null
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        if not isinstance(value, bool):
            raise SDNQConfigError(f"{where} must be true or false, got {_short(value)}")
    elif name in _DTYPE_FIELDS:
        if value is not None and not isinstance(value, str):
            raise SDNQConfigError(f"{where} must be a dtype name string, got {_short(value)}")
    elif name == "dynamic_loss_threshold":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SDNQConfigError(f"{where} must be a number or null, got {_short(value)}")
    elif name == "sdnq_version":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise SDNQConfigError(f"{where} must be a version string, got {_short(value)}")
    elif name in _LIST_FIELDS:
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise SDNQConfigError(f"{where}[{i}] must be a layer name string, got {_short(item)}")
    elif name == "modules_dtype_dict":
        for key, patterns in value.items():
            if not isinstance(patterns, (list, tuple)):
                raise SDNQConfigError(f"{where}[{key!r}] must be a list of layer names, got {_short(patterns)}")
            for i, item in enumerate(patterns):
                if not isinstance(item, str):
                    raise SDNQConfigError(f"{where}[{key!r}][{i}] must be a layer name string, got {_short(item)}")
    else:
        _check_nesting(value, where)
    return value


def _check_nesting(value: Any, where: str) -> None:
    """Refuse lists/objects nested deeper than :data:`MAX_NESTING` (iteratively: no recursion to overflow)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= MAX_NESTING:
            raise SDNQConfigError(f"{where} is nested more than {MAX_NESTING} levels deep")
        stack.extend((child, depth + 1) for child in children)


def warn_unused_patterns(config: QuantConfig, names: Iterable[str], owner: str, *, exact_only: bool,
                         ignore: Container[str] = (), stacklevel: int = 3) -> list[str]:
    """Warn (:class:`SDNQUnusedPatternWarning`) about config entries that match no layer of a model; returns
    them. ``owner`` names the model in the message; ``exact_only`` and ``ignore`` as in
    :meth:`QuantConfig.unused_patterns`."""
    unused = config.unused_patterns(names, exact_only=exact_only, ignore=ignore)
    if unused:
        warnings.warn(f"{owner}: quantization_config entries match no layer of this model (ignored): "
                      f"{', '.join(unused[:10])}{' ...' if len(unused) > 10 else ''}",
                      SDNQUnusedPatternWarning, stacklevel=stacklevel)
    return unused


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
