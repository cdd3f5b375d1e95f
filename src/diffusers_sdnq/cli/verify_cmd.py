"""``diffusers-sdnq verify``: read every tensor, check it against the config, dequantize, look for NaN/Inf.

One layer is in memory at a time: tensors come from memory-mapped ``safe_open`` handles, and each layer is
dequantized, checked and dropped before the next.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import torch

from ..format import codec
from .checkpoint import find_target
from .plan import ComponentPlan, plan_target
from .safetensors_io import read_header_entries


def nonfinite_problem(tensor: torch.Tensor, what: str) -> str | None:
    """A message when ``tensor`` holds NaN or Inf (count and first position), else None."""
    if not tensor.is_floating_point():
        return None
    values = tensor if tensor.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else tensor.float()
    bad = ~torch.isfinite(values)
    count = int(bad.sum())
    if not count:
        return None
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist()) if bad.ndim else ()
    nans = int(torch.isnan(values).sum())
    return (f"{what}: {count} non-finite value(s) of {values.numel()} ({nans} NaN, {count - nans} Inf), first at "
            f"index {list(first)}")


def _check_files(plan: ComponentPlan, problems: list[str]) -> set[str]:
    """Byte counts of every header entry, and the shard index against the shards' contents.

    Returns the files whose header cannot be read (they are reported once and not opened again).
    """
    comp = plan.component
    found: dict[str, str] = {}
    unreadable: set[str] = set()
    for file in comp.files:
        try:
            entries = read_header_entries(file)
        except ValueError as exc:
            unreadable.add(str(file))
            if str(exc) not in problems:
                problems.append(str(exc))
            continue
        for key, entry in entries.items():
            found[key] = file.name
            if entry.end - entry.start != entry.nbytes:
                problems.append(f"{file}: tensor '{key}' is {str(entry.dtype).replace('torch.', '')} "
                                f"{list(entry.shape)} = {entry.nbytes} bytes, but its data range holds "
                                f"{entry.end - entry.start} bytes (corrupt header)")
    if comp.index_file is not None:
        weight_map = json.loads(comp.index_file.read_text()).get("weight_map", {})
        for key, shard in weight_map.items():
            if key not in found and (comp.folder / shard).is_file():
                problems.append(f"{comp.index_file}: maps '{key}' to {shard}, which does not contain it")
            elif key in found and found[key] != shard:
                problems.append(f"{comp.index_file}: maps '{key}' to {shard}, but it is in {found[key]}")
        for key, shard in found.items():
            if key not in weight_map:
                problems.append(f"{comp.folder / shard}: tensor '{key}' is not in {comp.index_file.name}")
    return unreadable


def verify_component(plan: ComponentPlan, progress: bool = True) -> dict[str, Any]:
    """Check one component; returns counts and the list of problems (empty when the component is sound)."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    comp = plan.component
    problems = list(plan.problems)
    if plan.quant is None and comp.quant_dict is not None and not comp.is_sdnq:
        return {"ok": not problems, "layers": 0, "tensors": 0, "skipped": f"quantized with {comp.quant_method}",
                "problems": problems, "notes": plan.notes}
    unreadable = _check_files(plan, problems)
    handles: dict[str, Any] = {}
    checked_layers = checked_tensors = 0
    with contextlib.ExitStack() as stack:
        for file in comp.files:
            if str(file) in unreadable:
                continue
            try:
                handles[str(file)] = stack.enter_context(safe_open(str(file), "pt"))
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
                problems.append(f"{file}: safetensors cannot open it ({exc})")

        def load(key: str) -> torch.Tensor | None:
            file = plan.where.get(key)
            if file not in handles:
                return None
            try:
                return handles[file].get_tensor(key)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{file}: cannot read tensor '{key}' ({exc})")
                return None

        owned: set[str] = set()
        bar = tqdm(total=len(plan.headers), desc=f"verify {comp.name}", unit="tensor",
                   disable=None if progress else True)
        for name, info in plan.layers.items():
            tensors: dict[str, torch.Tensor] = {}
            stored_ok = True
            for key in info.tensors:
                full = f"{name}.{key}"
                owned.add(full)
                tensor = load(full)
                bar.update(1)
                if tensor is None:
                    stored_ok = False
                    continue
                checked_tensors += 1
                message = nonfinite_problem(tensor, f"{plan.where[full]}: stored tensor '{full}'")
                if message:
                    problems.append(message)
                    stored_ok = False
                if key != "bias":
                    tensors[key] = tensor
            if info.layout is not None and stored_ok:
                try:
                    weight = codec.dequantize(info.layout, tensors, prefix=f"{name}.")
                except ValueError as exc:
                    problems.append(f"{info.files['weight']}: layer '{name}' cannot be dequantized: {exc}")
                else:
                    message = nonfinite_problem(weight, f"{info.files['weight']}: dequantized weight of '{name}' "
                                                        f"({info.dtype_name}{'?' if info.guessed else ''})")
                    if message:
                        problems.append(message)
                    if tuple(weight.shape) != tuple(info.dense_shape):
                        problems.append(f"{info.files['weight']}: layer '{name}' dequantizes to "
                                        f"{list(weight.shape)}, expected {list(info.dense_shape)}")
            checked_layers += 1
            del tensors
        for key in plan.headers:
            if key in owned:
                continue
            tensor = load(key)
            bar.update(1)
            if tensor is None:
                continue
            checked_tensors += 1
            message = nonfinite_problem(tensor, f"{plan.where[key]}: tensor '{key}'")
            if message:
                problems.append(message)
        bar.close()
    return {"ok": not problems, "layers": checked_layers, "tensors": checked_tensors, "problems": problems,
            "notes": plan.notes}


def run(args: Any) -> int:
    target = find_target(args.path)
    plans = plan_target(target, use_model=not args.no_model)
    report = {"path": str(target.path), "components": {}}
    for plan in plans:
        report["components"][plan.component.name] = verify_component(plan, progress=not args.no_progress)
    failed = {name: r for name, r in report["components"].items() if r["problems"]}
    report["ok"] = not failed
    if args.json:
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    for name, result in report["components"].items():
        if result.get("skipped"):
            print(f"{name}: not checked ({result['skipped']})")
            continue
        status = "OK" if result["ok"] else f"FAILED ({len(result['problems'])} problem(s))"
        print(f"{name}: {status} - {result['layers']} quantized layer(s) dequantized, {result['tensors']} tensor(s) "
              "read")
        for note in result["notes"]:
            print(f"  note: {note}")
        for problem in result["problems"]:
            print(f"  - {problem}")
    total = sum(len(r["problems"]) for r in report["components"].values())
    print(f"{target.path}: " + ("all checks passed" if report["ok"] else f"{total} problem(s) found"))
    return 0 if report["ok"] else 1
