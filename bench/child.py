"""One measurement, in a fresh interpreter: load a model with one implementation and time its forward.

``python -m bench.child SPEC_JSON`` where the spec names ``impl`` (``dense``, ``reference``, ``ours``,
``ours-exact``, or ``reference-qmm`` / ``ours-qmm`` / ``ours-qmm-cache``: the quantized matmul switched on after
loading with each library's ``apply_sdnq_options_to_model(model, use_quantized_matmul=True)``),
``dtype``, ``path``, ``inputs`` (a safetensors file), ``output`` (where to save the first output), ``warmup``,
``iters``, ``threads`` and ``env``. Prints one JSON line with the timings and memory.

Memory is read from ``/proc/self/status``: the baseline is ``VmRSS`` after every import (so library code is not
counted), the peaks are ``VmHWM``, reset through ``/proc/self/clear_refs`` between load and forward.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def main(spec: dict) -> dict:
    os.environ.update(spec.get("env", {}))
    import torch

    torch.set_num_threads(int(spec["threads"]))
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file, save_file

    reference = spec["impl"].startswith("reference")
    if reference:
        import sdnq  # noqa: F401  (registers the reference's quantizer)
    elif spec["impl"].startswith("ours"):
        import diffusers_sdnq  # noqa: F401  (forward options from DIFFUSERS_SDNQ_FORWARD in spec["env"])
    dtype = getattr(torch, spec["dtype"])
    inputs = {k: (v.to(dtype) if k in ("hidden_states", "encoder_hidden_states") else v)
              for k, v in load_file(spec["inputs"]).items()}
    gc.collect()
    baseline = _status_kib("VmRSS")
    peak_reset = _reset_peak()

    t0 = time.perf_counter()
    model = Flux2Transformer2DModel.from_pretrained(spec["path"], torch_dtype=dtype).eval()
    if spec["impl"].endswith(("-qmm", "-qmm-cache")):  # what the model cards tell users to call after loading
        if reference:
            from sdnq.loader import apply_sdnq_options_to_model
        else:
            from diffusers_sdnq import apply_sdnq_options_to_model
        model = apply_sdnq_options_to_model(model, use_quantized_matmul=True)
    load_s = time.perf_counter() - t0
    gc.collect()
    peak_load = _status_kib("VmHWM") - baseline
    after_load = _status_kib("VmRSS") - baseline
    _reset_peak()

    times = []
    with torch.inference_mode():
        t1 = time.perf_counter()
        first = model(**inputs, return_dict=False)[0]
        first_s = time.perf_counter() - t1
        for _ in range(int(spec["warmup"])):
            model(**inputs, return_dict=False)
        for _ in range(int(spec["iters"])):
            t2 = time.perf_counter()
            model(**inputs, return_dict=False)
            times.append(time.perf_counter() - t2)
    peak_forward = _status_kib("VmHWM") - baseline
    save_file({"output": first.float().contiguous()}, spec["output"])
    # each implementation's own layer classes: the reference's carry sdnq_dequantizer, ours sdnq_layout
    marker = "sdnq_dequantizer" if reference else "sdnq_layout"
    quantized = sum(1 for m in model.modules() if hasattr(m, marker))
    if reference and "diffusers_sdnq" in sys.modules:
        raise RuntimeError("diffusers_sdnq was imported into the reference's process")
    return {
        "load_s": load_s,
        "first_forward_s": first_s,
        "ttff_s": load_s + first_s,
        "forward_s": statistics.median(times),
        "forward_min_s": min(times),
        "forward_all_s": times,
        "baseline_mib": baseline / 1024,
        "peak_load_mib": peak_load / 1024,
        "after_load_mib": after_load / 1024,
        "peak_forward_mib": peak_forward / 1024,
        "peak_mib": max(peak_load, peak_forward) / 1024,
        "peak_reset": peak_reset,
        "quantized_layers": quantized,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
