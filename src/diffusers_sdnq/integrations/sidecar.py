"""``quantization_config.json`` beside ``config.json``: the SDNQ sidecar both libraries ignore on their own.

sdnq writes the quantization config twice: inside ``config.json`` and as ``quantization_config.json`` in the
same folder. Checkpoints edited by hand or converted by other tools sometimes keep only the sidecar; loading
those with plain diffusers/transformers reads the packed integers as dense weights. The config loaders of both
libraries are wrapped (see :func:`install_diffusers` / :func:`install_transformers`) so that a config without
``quantization_config`` picks up an SDNQ sidecar when one exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..format.errors import SDNQConfigError

logger = logging.getLogger("diffusers_sdnq")

SIDECAR_NAME = "quantization_config.json"
SDNQ_METHODS = ("sdnq", "sdnq_training")


def _locate(path: str | os.PathLike, subfolder: str | None, kwargs: dict[str, Any]) -> str | None:
    """Local file path of the sidecar for a local folder or a Hub repo id; None when there is none."""
    path = os.fspath(path)
    sub = subfolder or ""
    if os.path.isdir(path):
        candidate = os.path.join(path, sub, SIDECAR_NAME)
        return candidate if os.path.isfile(candidate) else None
    if os.path.isfile(path) or path.count("/") > 1:
        return None  # a single file or not a repo id
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ImportError:  # pragma: no cover - huggingface_hub ships with both libraries
        return None
    revision = kwargs.get("revision")
    cache_dir = kwargs.get("cache_dir")
    filename = f"{sub.strip('/')}/{SIDECAR_NAME}" if sub else SIDECAR_NAME
    cached = try_to_load_from_cache(path, filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        return cached
    if cached is not None or HF_HUB_OFFLINE or kwargs.get("local_files_only"):
        return None  # known absent, or we may not ask the Hub
    try:
        return hf_hub_download(path, SIDECAR_NAME, subfolder=sub or None, revision=revision, cache_dir=cache_dir,
                               token=kwargs.get("token"), proxies=kwargs.get("proxies"))
    except Exception:  # absent file, unknown repo, no network: no sidecar, the load proceeds as it would
        return None


def read_sidecar(path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> dict[str, Any] | None:
    """The SDNQ quantization config stored beside a model's ``config.json``, or None.

    A sidecar that is not valid JSON raises :class:`SDNQConfigError` naming the file: loading on without it
    would read packed weights as dense ones.
    """
    file = _locate(path, subfolder, kwargs)
    if file is None:
        return None
    from ..layers.files import read_json_file

    data = read_json_file(file, "SDNQ quantization config")  # a regular file only; errors name the file
    if not isinstance(data, dict):
        raise SDNQConfigError(f"{file}: expected a JSON object with a 'quant_method', got {type(data).__name__}")
    if isinstance(data.get("quantization_config"), dict):  # some tools nest it
        data = data["quantization_config"]
    if data.get("quant_method") not in SDNQ_METHODS:
        return None
    from ..format.config import QuantConfig

    QuantConfig.from_dict(data, source=file)  # a bad field is an error naming this file and the field
    logger.info("diffusers-sdnq: using %s (config.json has no quantization_config)", file)
    return data


def sdnq_evidence(folder: str | os.PathLike) -> list[str]:
    """Names of layers in a local folder's safetensors files that are stored SDNQ-quantized.

    Evidence is a ``<layer>.scale`` beside a ``<layer>.weight`` whose dtype is an integer or float8 type, which
    no dense checkpoint has. Only headers are read.
    """
    import glob

    from ..format.errors import SDNQFormatError
    from ..layers.replace import read_safetensors_header

    found: list[str] = []
    for file in sorted(glob.glob(os.path.join(os.fspath(folder), "*.safetensors"))):
        try:  # a FIFO, device or socket is never opened (read_safetensors_header stats first)
            header = read_safetensors_header(file)
        except (SDNQFormatError, OSError):
            continue  # the library's own loader reports unreadable files
        for key in header:
            if not key.endswith(".scale"):
                continue
            weight = header.get(key[: -len("scale")] + "weight")
            if weight is not None and (not weight[1].is_floating_point or weight[1].itemsize == 1):
                found.append(key[: -len(".scale")])
    return found


#: Fields that change how stored tensors decode; config.json and the sidecar must agree on them.
DECODING_FIELDS = ("weights_dtype", "group_size", "use_svd", "svd_rank", "use_quantized_matmul",
                   "use_quantized_matmul_conv", "quantized_matmul_dtype", "use_hadamard", "hadamard_group_size",
                   "use_codebook", "use_codebook_scale", "scale_dtype", "zero_point_dtype", "modules_dtype_dict",
                   "modules_quant_config", "modules_to_not_use_matmul", "quant_conv", "quant_embedding")


def check_agreement(main: dict[str, Any], sidecar: dict[str, Any], folder: str) -> None:
    """Raise when config.json's quantization_config and quantization_config.json decode differently."""
    from ..format.config import QuantConfig

    a = QuantConfig.from_dict(main, source=f"{os.path.join(folder, 'config.json')}: quantization_config").to_dict()
    b = QuantConfig.from_dict(sidecar, source=os.path.join(folder, SIDECAR_NAME)).to_dict()
    differ = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in DECODING_FIELDS if a.get(k) != b.get(k)]
    if differ:
        raise SDNQConfigError(
            f"{os.path.join(folder, 'config.json')} and {os.path.join(folder, SIDECAR_NAME)} disagree on how the "
            f"weights are stored ({'; '.join(differ)}); one of them was edited. Keep the one written with the "
            "checkpoint (sdnq writes both identical) and delete or fix the other."
        )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_files(folder: str, headers: bool = True) -> None:
    """SDNQ checkpoints are read from safetensors only: refuse a folder whose weights are pickles (loading those
    can run code), then read every safetensors header (``headers``) so a truncated or corrupt file fails here
    with our message, naming the file and the tensor, instead of a generic loader error later."""
    import glob

    from ..format.errors import SDNQFormatError
    from ..layers.replace import read_safetensors_header

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        pickles = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise SDNQFormatError(f"{folder}: SDNQ weights are read from safetensors files only, found "
                                  f"{', '.join(pickles)} (pickle files can run code when loaded); convert them to "
                                  "safetensors or re-download the checkpoint in that format")
    if headers:
        for file in files:
            read_safetensors_header(file)


def _fill(config: Any, path: Any, kwargs: dict[str, Any], check_headers: bool = False) -> None:
    if not isinstance(config, dict) or not isinstance(path, (str, os.PathLike)):
        return
    folder = os.path.normpath(os.path.join(os.fspath(path), kwargs.get("subfolder") or ""))
    local = os.path.isdir(folder)
    options = {k: v for k, v in kwargs.items() if k != "subfolder"}
    current = config.get("quantization_config")
    if current:
        if isinstance(current, dict) and current.get("quant_method") in SDNQ_METHODS:
            from ..format.config import QuantConfig

            # checked here, where the file is known: a bad field is an error naming the file and the field
            QuantConfig.from_dict(current, source=f"{os.path.join(folder, 'config.json')}: quantization_config")
        if isinstance(current, dict) and current.get("quant_method") in SDNQ_METHODS and local:
            sidecar = read_sidecar(path, kwargs.get("subfolder"), **options)
            if sidecar is not None:
                check_agreement(current, sidecar, folder)
            check_files(folder, headers=check_headers)
        return
    sidecar = read_sidecar(path, kwargs.get("subfolder"), **options)
    if sidecar is not None:
        config["quantization_config"] = sidecar
        if local:
            check_files(folder, headers=check_headers)
        return
    from .._env import env_flag

    if local and not env_flag("DIFFUSERS_SDNQ_NO_GUARD", False):
        layers = sdnq_evidence(folder)
        if layers:
            raise SDNQConfigError(
                f"{folder}: {len(layers)} layer(s) are stored SDNQ-quantized (e.g. '{layers[0]}.weight' with "
                f"'{layers[0]}.scale') but {os.path.join(folder, 'config.json')} has no 'quantization_config' and "
                f"there is no {SIDECAR_NAME}; loading would read packed integers as dense weights. Restore the "
                "'quantization_config' written with the checkpoint (or its quantization_config.json)."
            )


@contextlib.contextmanager
def _nesting_errors(path: Any, subfolder: str | None, name: str | None) -> Iterator[None]:
    """A config file nested deeper than the JSON parser's recursion limit: an error naming the file, not a bare
    ``RecursionError`` from inside the library's loader."""
    try:
        yield
    except RecursionError:
        where = os.path.join(os.fspath(path), subfolder or "", name or "config.json") if isinstance(
            path, (str, os.PathLike)) else str(path)
        raise SDNQConfigError(f"{where}: the config file is nested too deeply to parse (a damaged or crafted "
                              "file)") from None


def install_diffusers() -> None:
    """Wrap ``ConfigMixin.load_config`` for models only (schedulers and pipelines are untouched). Idempotent."""
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_utils import ModelMixin

    from .upstream import resolve

    current = resolve("diffusers.configuration_utils:ConfigMixin.load_config")
    if getattr(current.__func__, "_sdnq_sidecar", False):
        return
    original = current.__func__

    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs=False, return_commit_hash=False,
                    **kwargs):
        with _nesting_errors(pretrained_model_name_or_path, kwargs.get("subfolder"), getattr(cls, "config_name", None)):
            out = original(cls, pretrained_model_name_or_path, return_unused_kwargs=return_unused_kwargs,
                           return_commit_hash=return_commit_hash, **kwargs)
        if isinstance(cls, type) and issubclass(cls, ModelMixin):
            _fill(out[0] if isinstance(out, tuple) else out, pretrained_model_name_or_path, kwargs,
                  check_headers=True)
        return out

    load_config._sdnq_sidecar = True  # type: ignore[attr-defined]
    load_config.__doc__ = original.__doc__
    ConfigMixin.load_config = classmethod(load_config)


def install_transformers() -> None:
    """Wrap ``PreTrainedConfig.get_config_dict`` (used by AutoConfig and every config class). Idempotent."""
    from transformers.configuration_utils import PreTrainedConfig as Base

    from .upstream import resolve

    current = resolve("transformers.configuration_utils:PreTrainedConfig.get_config_dict")
    if getattr(current.__func__, "_sdnq_sidecar", False):
        return
    original = current.__func__

    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        kw = dict(kwargs)
        with _nesting_errors(pretrained_model_name_or_path, kwargs.get("subfolder"),
                             kwargs.get("_configuration_file") or "config.json"):
            config, unused = original(cls, pretrained_model_name_or_path, **kwargs)
        _fill(config, pretrained_model_name_or_path, kw)
        return config, unused

    get_config_dict._sdnq_sidecar = True  # type: ignore[attr-defined]
    get_config_dict.__doc__ = original.__doc__
    Base.get_config_dict = classmethod(get_config_dict)
