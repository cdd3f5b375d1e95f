"""Child processes of ``python -m bench --gpu`` (see :mod:`bench.gpu`), one job each, one JSON line per result.

``python -m bench.gpu_child machine`` | ``bitexact SHARD SHARDS DEVICE`` | ``build SPEC_JSON`` | ``measure SPEC_JSON``.
Results are printed (and flushed) one line at a time, so a child stopped at its time limit still leaves what it
measured. The reference ``sdnq`` is imported only in ``measure`` children with ``impl == "reference"``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.device(device).type == "cuda" else None


def _allocated(device) -> int | None:
    import torch

    return int(torch.cuda.memory_allocated()) if torch.device(device).type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------- machine
def machine() -> None:
    import platform
    import subprocess

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # reported, not fatal: the torch path runs
        info["triton"] = f"unavailable ({exc})"
    for name in ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "sdnq", "safetensors"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    emit(info)


# ---------------------------------------------------------------------------------------------------------- bit-exact
INT_TYPES = [f"uint{b}" for b in range(1, 16) if b != 8] + [f"int{b}" for b in range(2, 16) if b != 8] + \
    ["int8", "uint8", "int16", "uint16"]
ALL_OUT = ("float32", "bfloat16", "float16")
#: every output dtype for these; float32 for the other types (each (kernel, flags, dtype) is one Triton compile)
FULL = {"uint4", "int4", "int8", "uint8", "uint3", "int5", "float8_e4m3fn", "float5_e2m2fn", "uint11"}
VARIANTS = {
    "svd": ("uint4", {"use_svd": True, "svd_rank": 8, "group_size": 32}),
    "codebook": ("uint3", {"use_codebook": True}),
    "codebook_grouped": ("uint4", {"use_codebook": True, "group_size": 32}),
    "double_quant": ("uint4", {"scale_dtype": "int8", "zero_point_dtype": "uint8", "group_size": 16}),
    "hadamard": ("int5", {"use_hadamard": True, "hadamard_group_size": 64}),
    "transposed_int8": ("int8", {"use_quantized_matmul": True}),
    "transposed_uint8": ("uint8", {"use_quantized_matmul": True}),
    "tensorwise": ("int6", {"group_size": -2}),
    "legacy_floats": ("float5_e2m2fn", {"sdnq_version": "0.2.0"}),
}


def bitexact_cases() -> list[tuple[str, str, dict, tuple[str, ...]]]:
    """(label, weights_dtype, options, output dtypes) of every case: each integer width grouped and per row,
    every float code type, the layout variants."""
    from diffusers_sdnq.format.dtypes import all_dtype_names, get_dtype

    cases = []
    for name in INT_TYPES:
        for group in (0, 32):
            cases.append((f"{name}/g{group}", name, {"group_size": group}, ALL_OUT if name in FULL else ALL_OUT[:1]))
    for name in all_dtype_names(include_aliases=False):
        qd = get_dtype(name)
        if (qd.kind == "float" or name in ("float16", "bfloat16") or name.startswith("float8_e")) and \
                name != "float32":
            cases.append((name, name, {}, ALL_OUT if name in FULL else ALL_OUT[:1]))
    for label, (name, options) in VARIANTS.items():
        cases.append((label, name, options, ALL_OUT))
    return cases


def _exact_fma_interpreter() -> None:
    """Dry runs on CPU: give Triton's interpreter a correctly rounded fma (its own rounds twice, a GPU's once)."""
    import numpy as np
    import triton.runtime.interpreter as ti

    def fma32(x, y, z):
        x64, y64, z64 = (np.asarray(a, dtype=np.float64) for a in (x, y, z))
        p = x64 * y64
        s = p + z64
        bb = s - p
        err = (p - (s - bb)) + (z64 - bb)
        inexact = err != 0
        t = np.where(inexact & (np.sign(err) != np.sign(s)) & (s != 0), np.nextafter(s, 0), s)
        return np.where(inexact, t.view(np.int64) | 1, t.view(np.int64)).view(np.float64).astype(np.float32)

    ti.InterpreterBuilder.create_fma = lambda self, x, y, z: ti.TensorHandle(fma32(x.data, y.data, z.data),
                                                                              z.dtype.scalar)


def bitexact(shard: int, shards: int, device: str, limit: int | None = None) -> None:
    import torch

    from diffusers_sdnq.format import codec, plan_layer
    from diffusers_sdnq.format.config import QuantConfig
    from diffusers_sdnq.layers import triton_decode
    from diffusers_sdnq.quantize import quantize_weight

    if device == "cpu":
        _exact_fma_interpreter()
    decoder = triton_decode.get(device)
    emit({"shard": shard, "decoder": None if decoder is None else {"fused": decoder.fused}})
    shape = (512, 1024) if device != "cpu" else (32, 64)
    cases = bitexact_cases()[shard::shards]
    for label, name, options, outs in cases[:limit]:
        t0 = time.perf_counter()
        cfg = {"quant_method": "sdnq", "weights_dtype": name, "sdnq_version": "0.2.8", **options}
        layout = plan_layer("linear", shape, QuantConfig.from_dict(cfg).options_for("l.weight", "linear"))
        gen = torch.Generator().manual_seed(zlib.crc32(label.encode()))
        tensors = quantize_weight(torch.randn(shape, generator=gen), layout)
        on_device = {k: v.to(device) for k, v in tensors.items()}
        record = {"case": label, "weights_dtype": name, "results": {}}
        try:
            for out in outs:
                dtype = getattr(torch, out)
                got = triton_decode.dequantize(layout, on_device, dtype)
                torch_dev = codec.dequantize(layout, on_device, dtype)
                cpu = codec.dequantize(layout, tensors, dtype)
                record["results"][out] = {
                    "kernel": got is not None,
                    "kernel_eq_torch": None if got is None else bool(torch.equal(got, torch_dev)),
                    "torch_device_eq_cpu": bool(torch.equal(torch_dev.cpu(), cpu)),
                }
        except Exception as exc:  # reported per case
            record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        record["seconds"] = round(time.perf_counter() - t0, 2)
        emit(record)


# ---------------------------------------------------------------------------------------------------------- models
def _size(spec: dict):
    import dataclasses

    from .model import SIZES

    size = SIZES[spec["size"]]
    if spec.get("tokens"):
        image, text = spec["tokens"]
        size = dataclasses.replace(size, image_tokens=image, text_tokens=text)
    return size


def build_dense(spec: dict):
    """The dense transformer, seeded random weights made on ``spec["device"]`` (fast on a GPU; the same numbers in
    every child on the same machine), in bfloat16."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from .model import OUTLIERS

    size = _size(spec)
    device = torch.device(spec["device"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in bfloat16 on the device: no float32 copy of 4B parameters
    try:
        with device:
            model = Flux2Transformer2DModel(**size.transformer_kwargs())
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(int(spec.get("seed", 0)))
    with torch.no_grad():
        index = 0
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.ndim >= 2:
                value = torch.randn(param.shape, generator=gen, device=device) / param.shape[1:].numel() ** 0.5
                magnitude = OUTLIERS[index % len(OUTLIERS)]
                if magnitude != 1.0:
                    value = torch.where(torch.rand(param.shape, generator=gen, device=device) < 0.01,
                                        value * magnitude, value)
                param.copy_(value)
                index += 1
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=gen, device=device))
            else:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen, device=device))
    return model.eval()


def inputs(spec: dict):
    import torch

    from .model import make_inputs

    size = _size(spec)
    return {k: (v.to(spec["device"], torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states")
                else v.to(spec["device"])) for k, v in make_inputs(size).items()}


#: Writer options of each benchmark variant (quantized by this package on the GPU).
QUANT_VARIANTS = {
    "uint4_svd": {"weights_dtype": "uint4", "use_svd": True, "svd_rank": 32},
    "int8": {"weights_dtype": "int8", "use_quantized_matmul": True},
}


def build(spec: dict) -> None:
    """Quantize the dense transformer with our writer on the GPU (model resident on the CPU, each layer quantized
    on ``device`` and returned), save each variant to ``spec["out"]/<variant>``."""
    import shutil

    import torch

    import diffusers_sdnq  # noqa: F401
    from diffusers_sdnq.quantize import quantize_model

    device = spec["device"]
    out = Path(spec["out"])
    for variant in spec["variants"]:
        target = out / variant
        if (target / "config.json").is_file():
            emit({"variant": variant, "cached": True, "disk_bytes": _disk(target)})
            continue
        t0 = time.perf_counter()
        model = build_dense(spec).to("cpu")
        _sync(device)
        build_s = time.perf_counter() - t0
        _peak_reset(device)
        t1 = time.perf_counter()
        quantize_model(model, quantization_device=device, return_device="cpu", progress=False,
                       **QUANT_VARIANTS[variant])
        _sync(device)
        quant_s = time.perf_counter() - t1
        tmp = out / f"tmp-{variant}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), max_shard_size="20GB")
        tmp.rename(target)
        layers = [m for m in model.modules() if hasattr(m, "sdnq_layout")]
        largest = max(m.sdnq_layout.weight_shape[0] * m.sdnq_layout.weight_shape[1] for m in layers)
        emit({"variant": variant, "build_s": build_s, "quantize_s": quant_s, "quantize_peak_vram": _peak(device),
              "disk_bytes": _disk(target), "quantized_layers": len(layers), "largest_layer_numel": largest,
              "options": QUANT_VARIANTS[variant]})
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def _disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------------- measure
def _load(spec: dict, device):
    import torch
    from diffusers import Flux2Transformer2DModel

    if spec["impl"] == "dense":
        return build_dense({**spec, "device": str(device)})
    return Flux2Transformer2DModel.from_pretrained(spec["path"], torch_dtype=torch.bfloat16).to(device).eval()


def _time(model, inputs: dict, warmup: int, iters: int, device) -> tuple[list[float], object]:
    import torch

    first = None
    with torch.inference_mode():
        for i in range(warmup):
            out = model(**inputs, return_dict=False)[0]
            first = out if i == 0 else first
        times = []
        for _ in range(iters):
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs, return_dict=False)[0]
            _sync(device)
            times.append(time.perf_counter() - t0)
    return times, first if first is not None else out


def measure(spec: dict) -> None:
    """Load one implementation and run its modes, one JSON line each: ``eager``, ``compiled`` (diffusers'
    ``compile_repeated_blocks``), ``group_offload`` (block level, CUDA stream), and ``options:k=v,...`` (ours:
    forward options, e.g. ``options:svd=weight``)."""
    os.environ.update(spec.get("env", {}))
    import torch

    if spec["impl"] == "reference":
        import sdnq  # noqa: F401  (registers the reference's quantizer)
    elif spec["impl"] == "ours":
        import diffusers_sdnq  # noqa: F401
    device = torch.device(spec["device"])
    outputs = Path(spec["outputs"])
    outputs.mkdir(parents=True, exist_ok=True)
    x = inputs(spec)
    _peak_reset(device)
    t0 = time.perf_counter()
    model = _load(spec, device)
    _sync(device)
    load = {"load_s": time.perf_counter() - t0, "weights_bytes": _allocated(device), "load_peak": _peak(device)}
    eager_out = None
    for mode in spec["modes"]:
        record = {"impl": spec["impl"], "label": spec.get("label", spec["impl"]), "mode": mode, **load}
        try:
            t1 = time.perf_counter()
            target = model
            if mode == "compiled":
                kwargs = {"fullgraph": spec.get("fullgraph", True)}
                if spec.get("backend"):
                    kwargs["backend"] = spec["backend"]
                model.compile_repeated_blocks(**kwargs)
            elif mode == "group_offload":  # the last mode: the resident model leaves the GPU first
                model.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                target = _load(spec, "cpu")
                target.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                            offload_type="block_level", num_blocks_per_group=1,
                                            use_stream=device.type == "cuda")
            elif mode.startswith("options:"):
                from diffusers_sdnq.layers.forward import set_forward_options

                changes = dict(item.split("=", 1) for item in mode.split(":", 1)[1].split(","))
                typed = {k: (v.lower() in ("1", "true") if v.lower() in ("0", "1", "true", "false") else v)
                         for k, v in changes.items()}
                set_forward_options(model, **typed)
            _peak_reset(device)
            times, out = _time(target, x, spec["warmup"], spec["iters"], device)
            record.update(first_s=time.perf_counter() - t1 - sum(times), forward_s=statistics.median(times),
                          forward_min_s=min(times), forward_all_s=times, peak=_peak(device))
            variant = Path(spec["path"]).name if spec.get("path") else "dense"
            file = outputs / f"{spec.get('label', spec['impl'])}-{variant}-{mode.replace(':', '_').replace(',', '_')}.pt"
            torch.save(out.float().cpu(), file)
            record["output"] = str(file)
            if mode == "eager":
                eager_out = out
            elif eager_out is not None:
                record["equal_to_eager"] = bool(torch.equal(out, eager_out))
                record["max_abs_vs_eager"] = float((out.float() - eager_out.float()).abs().max())
            if mode.startswith("options:"):
                from diffusers_sdnq.layers.forward import set_forward_options

                set_forward_options(model, svd="activations")  # back to the defaults for the next mode
        except Exception as exc:
            import traceback

            record["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            record["traceback"] = traceback.format_exc()[-2000:]
        record["quantized_layers"] = sum(1 for m in model.modules()
                                         if hasattr(m, "sdnq_layout") or hasattr(m, "sdnq_dequantizer"))
        emit(record)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    command = argv[0]
    if command == "machine":
        machine()
    elif command == "bitexact":
        bitexact(int(argv[1]), int(argv[2]), argv[3], int(argv[4]) if len(argv) > 4 else None)
    elif command == "build":
        build(json.loads(argv[1]))
    elif command == "measure":
        measure(json.loads(argv[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
