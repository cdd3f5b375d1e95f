"""``diffusers-sdnq inspect``: what a checkpoint holds, from configs and safetensors headers only."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any

from .checkpoint import Target, find_target
from .plan import ComponentPlan, plan_target, tensor_nbytes


def _count(values: list[Any]) -> dict[str, int]:
    counts = Counter(values)
    return {str(k): counts[k] for k in sorted(counts, key=lambda v: (isinstance(v, str), v))}


def _is_float(meta: tuple[tuple[int, ...], Any]) -> bool:
    return meta[1].is_floating_point


def component_report(plan: ComponentPlan) -> dict[str, Any]:
    """Machine-readable description of one component (the ``--json`` schema, documented in docs/cli.md)."""
    comp = plan.component
    quant = plan.quant
    layers = plan.layers
    q_dense = sum(info.dense_numel for info in layers.values())
    q_bytes = sum(info.stored_bytes for info in layers.values())
    owned = {f"{n}.{k}" for n, info in layers.items() for k in info.tensors if k != "bias"}
    plain = [k for k in plan.headers if k not in owned]
    plain_float = [k for k in plain if _is_float(plan.headers[k])]
    plain_float_numel = sum(math.prod(plan.headers[k][0]) for k in plain_float)
    plain_float_bytes = sum(tensor_nbytes(plan.headers[k]) for k in plain_float)
    other_bytes = sum(tensor_nbytes(plan.headers[k]) for k in plain if not _is_float(plan.headers[k]))
    tensor_bytes = sum(tensor_nbytes(meta) for meta in plan.headers.values())
    dense_numel = q_dense + plain_float_numel
    guessed = any(info.guessed for info in layers.values())
    return {
        "name": comp.name,
        "folder": str(comp.folder),
        "class": f"{comp.library}.{comp.class_name}" if comp.class_name else None,
        "files": [{"name": os.path.relpath(f, comp.folder), "bytes": os.path.getsize(f)} for f in comp.files],
        "quantized": bool(layers) or quant is not None or comp.quant_dict is not None,
        "quant_method": comp.quant_method if comp.quant_dict is not None else ("sdnq?" if layers else None),
        "quant_config_source": comp.quant_source,
        "sdnq_version": quant.sdnq_version if quant else None,
        "weights_dtype": quant.weights_dtype if quant else None,
        "shape_source": plan.shape_source,
        "guessed": guessed,
        "quantized_layers": len(layers),
        "dtypes": _count([info.dtype_name for info in layers.values()]),
        "widths": _count([info.bits for info in layers.values() if info.bits]),
        "group_sizes": _count([info.group_size for info in layers.values() if info.group_size is not None]),
        "svd_ranks": _count([info.svd_rank for info in layers.values() if info.svd_rank]),
        "bits_per_weight": round(q_bytes * 8 / q_dense, 4) if q_dense else None,
        "bits_per_weight_overall": round((q_bytes + plain_float_bytes) * 8 / dense_numel, 4) if dense_numel else None,
        "dense_parameters": dense_numel,
        "bytes_on_disk": sum(os.path.getsize(f) for f in comp.files),
        "bytes_tensors": tensor_bytes,
        "bytes_dense_bf16": 2 * dense_numel + other_bytes,
        "skipped": [{"name": s.name, "kind": s.kind, "reason": s.reason} for s in plan.skipped],
        "layers": {
            name: {
                "dtype": info.dtype_name,
                "bits": info.bits,
                "kind": info.kind,
                "shape": list(info.dense_shape),
                "group_size": info.group_size,
                "num_groups": info.layout.num_groups if info.layout else (info.facts.num_groups if info.facts else None),
                "svd_rank": info.svd_rank,
                "transposed": info.layout.transposed if info.layout else bool(info.facts and info.facts.transposed),
                "zero_point": info.layout.has_zero_point if info.layout else bool(info.facts and info.facts.has_zero_point),
                "stored_bytes": info.stored_bytes,
                "guessed": info.guessed,
            }
            for name, info in layers.items()
        },
        "notes": plan.notes,
        "problems": plan.problems,
    }


def target_report(target: Target, plans: list[ComponentPlan]) -> dict[str, Any]:
    return {
        "path": str(target.path),
        "kind": target.kind,
        "pipeline_class": target.pipeline_class,
        "components": {p.component.name: component_report(p) for p in plans},
        "other_components": {k: v for k, v in target.other_entries.items() if v[0] is not None},
        "problems": sum(len(p.problems) for p in plans),
    }


def human_size(num: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(num) < 1000 or unit == "GB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.2f} {unit}"
        num /= 1000
    return f"{num:.2f} TB"  # pragma: no cover - unreachable


def _hist(counts: dict[str, int], suffix: str = "") -> str:
    return ", ".join(f"{k}{suffix} ×{v}" for k, v in counts.items()) or "-"


def render(report: dict[str, Any], show_layers: bool = False) -> str:
    lines = [f"{report['path']}  ({report['kind']}"
             + (f": {report['pipeline_class']}" if report["pipeline_class"] else "") + ")"]
    for name, c in report["components"].items():
        lines.append("")
        head = f"{name}  {c['class'] or ''}".rstrip()
        if c["quant_method"] and c["quant_method"] not in ("sdnq", "sdnq_training", "sdnq?"):
            lines.append(f"{head}  quantized with {c['quant_method']} (not SDNQ)")
        elif c["quantized"]:
            version = f", written by sdnq {c['sdnq_version']}" if c["sdnq_version"] else ""
            lines.append(f"{head}  quant_method={c['quant_method']}{version}, weights_dtype={c['weights_dtype'] or '?'}")
            mark = "  (guessed from the tensors, no config)" if c["guessed"] else ""
            lines.append(f"  quantized layers: {c['quantized_layers']}   dtypes: {_hist(c['dtypes'])}{mark}")
            lines.append(f"  group sizes: {_hist(c['group_sizes'])}   SVD rank: {_hist(c['svd_ranks'])}")
            if c["bits_per_weight"] is not None:
                lines.append(f"  bits per weight: {c['bits_per_weight']:.2f} in quantized layers (scales, zero points, "
                             f"SVD included), {c['bits_per_weight_overall']:.2f} overall")
        else:
            lines.append(f"{head}  not quantized")
        if c["files"]:
            share = 100 * c["bytes_on_disk"] / c["bytes_dense_bf16"] if c["bytes_dense_bf16"] else 0
            lines.append(f"  on disk: {human_size(c['bytes_on_disk'])} in {len(c['files'])} file(s) = {share:.0f}% of "
                         f"dense bf16 ({human_size(c['bytes_dense_bf16'])})")
        if c["quantized"] and c["skipped"]:
            shown = ", ".join(s["name"] for s in c["skipped"][:8])
            more = f", ... ({len(c['skipped']) - 8} more)" if len(c["skipped"]) > 8 else ""
            lines.append(f"  skipped layers ({len(c['skipped'])}): {shown}{more}")
        if show_layers and c["layers"]:
            for lname, layer in c["layers"].items():
                extra = f" g{layer['group_size']}" if layer["group_size"] and layer["group_size"] > 0 else " rowwise"
                extra += f" svd{layer['svd_rank']}" if layer["svd_rank"] else ""
                extra += " T" if layer["transposed"] else ""
                lines.append(f"    {lname}: {layer['dtype']}{'?' if layer['guessed'] else ''} {layer['shape']}{extra}")
        for note in c["notes"]:
            lines.append(f"  note: {note}")
        for problem in c["problems"]:
            lines.append(f"  PROBLEM: {problem}")
    if report["other_components"]:
        lines.append("")
        lines.append("other components: " + ", ".join(report["other_components"]))
    return "\n".join(lines)


def run(args: Any) -> int:
    target = find_target(args.path)
    plans = plan_target(target, use_model=not args.no_model)
    report = target_report(target, plans)
    print(json.dumps(report, indent=1) if args.json else render(report, args.layers))
    return 1 if report["problems"] else 0
