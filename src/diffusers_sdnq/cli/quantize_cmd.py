"""``diffusers-sdnq quantize``: quantize a dense pipeline or model folder with the package's writer.

Each selected component is loaded with ``from_pretrained(..., quantization_config=...)`` (quantize on load) and
written with ``save_pretrained``; the rest of the folder is copied. The config is validated, and the writer asked
whether it can produce it, before any weight is read.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..format.config import QuantConfig
from .checkpoint import CONFIG_NAME, QUANT_CONFIG_NAME, CLIError, Component, find_target
from .dequantize_cmd import DTYPES, _is_weight_file
from .output import atomic_dir, check_out
from .paths import copy_entry, dest
from .plan import resolve_class

DEFAULT_COMPONENTS = ("transformer", "unet")


def quant_kwargs(args: Any) -> dict[str, Any]:
    """The SDNQ config fields the command-line options ask for."""
    kwargs: dict[str, Any] = {"weights_dtype": args.weights_dtype}
    if args.svd_rank is not None:
        kwargs.update(use_svd=True, svd_rank=args.svd_rank)
    if args.dynamic:
        kwargs["use_dynamic_quantization"] = True
    if args.group_size is not None:
        kwargs["group_size"] = args.group_size
    if getattr(args, "min_numel", None) is not None:
        kwargs["minimum_allowed_numel"] = args.min_numel
    return kwargs


def check_writer(kwargs: dict[str, Any]) -> None:
    """Fail now, with the writer's own message, when it cannot produce these options."""
    from .. import quantize as writer

    config = QuantConfig.from_dict(kwargs, source="command-line options")  # bad dtype names etc.
    check = getattr(writer, "check_can_quantize", None)
    if check is not None:
        check(config)


def _select(target: Any, names: str | None) -> list[Component]:
    comps = {c.name: c for c in target.components}
    if target.kind == "model":
        if names:
            raise CLIError(f"{target.path} is a model folder, not a pipeline; --components does not apply")
        return list(comps.values())
    if target.kind != "pipeline":
        raise CLIError(f"{target.path}: quantize needs a model folder or a pipeline folder, not a single file")
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        missing = [n for n in wanted if n not in comps]
        if missing:
            raise CLIError(f"{target.path} has no component(s) {', '.join(missing)} with weights; it has "
                           + ", ".join(comps))
    else:
        wanted = [n for n in comps if n in DEFAULT_COMPONENTS]
        if not wanted:
            raise CLIError(f"{target.path}: no 'transformer' or 'unet' component; name the components to quantize "
                           "with --components")
    return [comps[n] for n in wanted]


def _load_dtype(comp: Component, choice: str) -> torch.dtype:
    """``auto``: the most common float dtype among the component's stored tensors (float32 when none)."""
    if choice != "auto":
        return DTYPES[choice]
    from ..layers.replace import read_checkpoint_headers

    headers, _ = read_checkpoint_headers(comp.files)
    counts = Counter(dtype for _, dtype in headers.values() if dtype.is_floating_point)
    return counts.most_common(1)[0][0] if counts else torch.float32


def quantize_component(comp: Component, out_folder: Path, kwargs: dict[str, Any], load_dtype: torch.dtype,
                       roots: list[Path] | None = None) -> int:
    """Quantize one component on load and save it; returns the number of SDNQ layers written. ``roots``: where the
    input's files may lie (:func:`.paths.input_roots`; default the component's folder)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from ..layers import sdnq_layers

    if comp.quant_dict is not None:
        raise CLIError(f"component '{comp.name}' is already quantized ({comp.quant_method}); quantize a dense folder")
    cls = resolve_class(comp)
    if cls is None:
        raise CLIError(f"component '{comp.name}': model class {comp.library}.{comp.class_name} is not available")
    where = f"component '{comp.name}' ({comp.library}.{comp.class_name})"
    if isinstance(cls, type) and issubclass(cls, ModelMixin):
        from ..integrations.diffusers import SDNQDiffusersConfig

        load = {"quantization_config": SDNQDiffusersConfig(**kwargs), "torch_dtype": load_dtype}
    elif isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        from ..integrations.transformers import SDNQTransformersConfig

        load = {"quantization_config": SDNQTransformersConfig(**kwargs), "dtype": load_dtype}
    else:
        raise CLIError(f"{where} is neither a diffusers ModelMixin nor a transformers PreTrainedModel")
    try:
        model = cls.from_pretrained(str(comp.folder), **load)
    except (ValueError, NotImplementedError) as exc:
        raise CLIError(f"{where} cannot be quantized: {exc}") from None
    count = len(sdnq_layers(model))
    if not count:
        raise CLIError(f"{where}: no layer was quantized (every layer was skipped as too small or excluded)")
    model.save_pretrained(str(out_folder))
    config = json.loads((out_folder / CONFIG_NAME).read_text())
    if "quantization_config" in config:  # the sidecar the reference also writes; loaders accept either
        (out_folder / QUANT_CONFIG_NAME).write_text(json.dumps(config["quantization_config"], indent=2) + "\n")
    for entry in sorted(comp.folder.iterdir()):  # files save_pretrained does not write (e.g. a README)
        if not (out_folder / entry.name).exists() and not _is_weight_file(entry):
            copy_entry(entry, dest(out_folder, entry.name), roots or [comp.folder.resolve()])
    del model
    return count


def run(args: Any) -> int:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    kwargs = quant_kwargs(args)
    check_writer(kwargs)

    were_disabled = are_progress_bars_disabled()
    if args.no_progress:  # the writer's per-layer bar and the libraries' loading bars follow huggingface_hub's switch
        disable_progress_bars()
    try:
        return _run(args, kwargs)
    finally:
        if args.no_progress and not were_disabled:
            enable_progress_bars()


def _run(args: Any, kwargs: dict[str, Any]) -> int:
    from tqdm.auto import tqdm

    target = find_target(args.src)
    out = check_out(target.path, Path(args.out), args.overwrite)
    selected = _select(target, args.components)
    for comp in selected:
        if comp.problems:
            raise CLIError(f"component '{comp.name}': " + "; ".join(comp.problems))
    counts: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        bar = tqdm(selected, desc="quantize", unit="component", disable=None if not args.no_progress else True)
        for comp in bar:
            bar.set_postfix_str(comp.name)
            folder = tmp if target.kind == "model" else dest(tmp, comp.name)
            counts[comp.name] = quantize_component(comp, folder, kwargs, _load_dtype(comp, args.torch_dtype),
                                                   target.roots)
        if target.kind == "pipeline":
            names = {c.name for c in selected}
            for entry in sorted(target.path.iterdir()):
                if entry.name not in names:
                    copy_entry(entry, dest(tmp, entry.name), target.roots)
    summary = ", ".join(f"{name} ({n} layers)" for name, n in counts.items())
    print(f"wrote {out}: {kwargs['weights_dtype']} {summary}")
    return 0


__all__ = ["check_writer", "quant_kwargs", "run"]
