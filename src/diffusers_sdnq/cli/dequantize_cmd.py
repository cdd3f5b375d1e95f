"""``diffusers-sdnq dequantize``: write a plain diffusers/transformers folder that loads without this package.

Each output shard is written by :class:`StreamingSafetensorsWriter`: its header comes from the planned dense
shapes, then the tensors follow one at a time, so only one dequantized layer is in memory at once. The output
keeps the input's sharding (same shard names, index rewritten), drops ``quantization_config`` from
``config.json`` and the ``quantization_config.json`` file, and copies every other file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from ..format import codec
from .checkpoint import CONFIG_NAME, INDEX_SUFFIX, QUANT_CONFIG_NAME, CLIError, find_target
from .output import atomic_dir, atomic_file, check_out
from .paths import copy_entry, dest
from .plan import ComponentPlan, plan_target
from .safetensors_io import StreamingSafetensorsWriter, read_header_entries
from .verify_cmd import nonfinite_problem

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def _plain_config(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    for key in ("torch_dtype", "dtype"):  # transformers records the weights' dtype here
        if key in out:
            out[key] = str(dtype).replace("torch.", "")
    return out


def _is_weight_file(path: Path) -> bool:
    return path.name.endswith(".safetensors") or path.name.endswith(INDEX_SUFFIX)


def check_plan(plan: ComponentPlan) -> None:
    """Refuse to write anything from a component whose layouts are not known exactly."""
    comp = plan.component
    if plan.problems:
        raise CLIError(f"component '{comp.name}' has problems; nothing was written (run `diffusers-sdnq verify`):\n  - "
                       + "\n  - ".join(plan.problems))
    if comp.quant_dict is not None and not comp.is_sdnq:
        raise CLIError(f"component '{comp.name}' is quantized with '{comp.quant_method}', not SDNQ; "
                       "diffusers-sdnq cannot dequantize it")
    if plan.layers and plan.quant is None:
        raise CLIError(f"{comp.folder}: quantized tensors but no quantization_config (config.json or "
                       f"{QUANT_CONFIG_NAME}); the stored bytes alone do not say which dtype each layer uses")


def write_shards(plan: ComponentPlan, out_folder: Path, dtype: torch.dtype, progress: bool = True,
                 single_file: Path | None = None) -> dict[str, str]:
    """Write the dense tensors of a component's shards into ``out_folder``; returns key → shard file name."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    weight_of = {f"{name}.weight": info for name, info in plan.layers.items()}
    companions = {f"{name}.{k}" for name, info in plan.layers.items() for k in info.tensors if k not in ("weight", "bias")}
    weight_map: dict[str, str] = {}
    total = sum(1 for k in plan.headers if k not in companions)
    bar = tqdm(total=total, desc=f"dequantize {plan.component.name}", unit="tensor", disable=None if progress else True)
    with contextlib.ExitStack() as stack:
        handles = {str(f): stack.enter_context(safe_open(str(f), "pt")) for f in plan.component.files}

        def load(key: str) -> torch.Tensor:
            return handles[plan.where[key]].get_tensor(key)

        for file in plan.component.files:
            entries = read_header_entries(file)
            order = sorted((k for k in entries if k not in companions), key=lambda k: entries[k].start)
            specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
            for key in order:
                if key in weight_of:
                    specs.append((key, dtype, tuple(weight_of[key].dense_shape)))
                else:
                    src_dtype = entries[key].dtype
                    specs.append((key, dtype if src_dtype.is_floating_point and plan.quant else src_dtype,
                                  entries[key].shape))
            target = single_file or dest(out_folder, file.name)
            with StreamingSafetensorsWriter(target, specs) as writer:
                for key, out_dtype, _ in specs:
                    if key in weight_of:
                        info = weight_of[key]
                        stored = {k: load(f"{info.name}.{k}") for k in info.tensors if k != "bias"}
                        tensor = codec.dequantize(info.layout, stored, dtype=out_dtype, prefix=f"{info.name}.")
                        message = nonfinite_problem(tensor, f"{file}: dequantized weight of '{info.name}'")
                        if message:
                            raise CLIError(message + "; nothing was written (run `diffusers-sdnq verify`)")
                        del stored
                    else:
                        tensor = load(key).to(out_dtype)
                    writer.write(key, tensor)
                    weight_map[key] = target.name
                    del tensor
                    bar.update(1)
    bar.close()
    return weight_map


def dequantize_component(plan: ComponentPlan, out_folder: Path, dtype: torch.dtype, roots: list[Path],
                         progress: bool = True) -> None:
    """Write one component as a plain folder (config without quantization_config, dense shards, other files).
    ``roots``: where the input's files may lie (:func:`.paths.input_roots`)."""
    comp = plan.component
    check_plan(plan)
    out_folder.mkdir(parents=True, exist_ok=True)
    if not plan.quantized:  # nothing to decode: copy the folder byte for byte
        for entry in sorted(comp.folder.iterdir()):
            copy_entry(entry, dest(out_folder, entry.name), roots)
        return
    for entry in sorted(comp.folder.iterdir()):
        if entry.name in (CONFIG_NAME, QUANT_CONFIG_NAME) or _is_weight_file(entry):
            continue
        copy_entry(entry, dest(out_folder, entry.name), roots)
    if comp.config is not None:
        (out_folder / CONFIG_NAME).write_text(json.dumps(_plain_config(comp.config, dtype), indent=2, sort_keys=True)
                                              + "\n")
    weight_map = write_shards(plan, out_folder, dtype, progress)
    if comp.index_file is not None:
        total = sum(f.stat().st_size for f in out_folder.glob("*.safetensors"))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_folder / comp.index_file.name).write_text(json.dumps(index, indent=2) + "\n")


def run(args: Any) -> int:
    target = find_target(args.path)
    out = check_out(target.path, Path(args.out), args.overwrite)
    dtype = DTYPES[args.dtype]
    plans = plan_target(target, use_model=not args.no_model)
    for plan in plans:
        check_plan(plan)  # every component is checked before anything is written
    if not any(p.quantized for p in plans):
        raise CLIError(f"{target.path}: no SDNQ-quantized component, nothing to dequantize")
    progress = not args.no_progress
    if target.kind == "file":
        plan = plans[0]
        with atomic_file(out) as tmp:
            write_shards(plan, tmp.parent, dtype, progress, single_file=tmp)
    elif target.kind == "model":
        with atomic_dir(out) as tmp:
            dequantize_component(plans[0], tmp, dtype, target.roots, progress)
    else:
        done = {p.component.name for p in plans}
        with atomic_dir(out) as tmp:
            for plan in plans:
                dequantize_component(plan, dest(tmp, plan.component.name), dtype, target.roots, progress)
            for entry in sorted(target.path.iterdir()):
                if entry.name not in done:
                    copy_entry(entry, dest(tmp, entry.name), target.roots)
    layers = sum(len(p.layers) for p in plans)
    copied = [p.component.name for p in plans if not p.quantized]
    print(f"wrote {out}: {layers} layer(s) dequantized to {str(dtype).replace('torch.', '')}"
          + (f"; copied unchanged: {', '.join(copied)}" if copied else ""))
    return 0
