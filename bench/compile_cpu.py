"""Compiled against eager forward of the quantized Klein-shaped slice, A/B interleaved in one process.

``python -m bench.compile_cpu [--size klein-slice] [--dtype float32] [--iters 7]`` builds the dense slice (seeded
random weights, :mod:`bench.model`), quantizes it with this package's writer (uint4 + SVD rank 32 by default),
compiles it with ``torch.compile(model, fullgraph=True)`` and times eager and compiled forwards alternately (so a
shared machine's load hits both alike). It reports the median ratio compiled / eager, the compile time, how many
graphs Dynamo made and whether it recompiled, and the largest output difference. The quantized layers run the
same kernels in both (the decoders are operators in the compiled graph); the rest of the model is compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict, iters: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (order rotated every round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def build_quantized(size_name: str, dtype, weights_dtype: str, svd_rank: int, seed: int = 0):
    """The dense slice (:mod:`bench.model`), quantized in memory by our writer; returns (model, inputs)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from diffusers_sdnq.quantize import quantize_model

    from .model import SIZES, make_inputs, randomize_

    size = SIZES[size_name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Flux2Transformer2DModel(**size.transformer_kwargs())
    finally:
        torch.set_default_dtype(previous)
    randomize_(model, seed)
    options = {"weights_dtype": weights_dtype}
    if svd_rank:
        options.update(use_svd=True, svd_rank=svd_rank)
    quantize_model(model, progress=False, **options)
    model = model.to(dtype).eval()
    inputs = {k: (v.to(dtype) if v.is_floating_point() and k in ("hidden_states", "encoder_hidden_states") else v)
              for k, v in make_inputs(size).items()}
    return model, inputs


def run(size_name: str = "klein-slice", dtype_name: str = "float32", weights_dtype: str = "uint4",
        svd_rank: int = 32, iters: int = 7, threads: int | None = None) -> dict:
    import torch
    from torch._dynamo.utils import counters

    if threads:
        torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    model, inputs = build_quantized(size_name, dtype, weights_dtype, svd_rank)
    build_s = time.perf_counter() - t0
    compiled = torch.compile(model, fullgraph=True)
    counters.clear()
    with torch.inference_mode():
        eager_out = model(**inputs, return_dict=False)[0]
        t1 = time.perf_counter()
        compiled_out = compiled(**inputs, return_dict=False)[0]
        compile_s = time.perf_counter() - t1
        model(**inputs, return_dict=False)  # one more warm-up each
        compiled(**inputs, return_dict=False)
        times = interleaved({"eager": lambda: model(**inputs, return_dict=False),
                             "compiled": lambda: compiled(**inputs, return_dict=False)}, iters)
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    ops_in_graph = sum(1 for m in model.modules() if hasattr(m, "sdnq_layout"))
    return {
        "size": size_name, "dtype": dtype_name, "weights_dtype": weights_dtype, "svd_rank": svd_rank,
        "threads": torch.get_num_threads(), "iters": iters, "build_s": build_s, "compile_s": compile_s,
        "eager_s": eager, "compiled_s": comp, "ratio": comp / eager,
        "eager_all_s": times["eager"], "compiled_all_s": times["compiled"],
        "unique_graphs": counters["stats"]["unique_graphs"], "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": sum(counters["graph_break"].values()),
        "max_abs_diff": float((compiled_out.float() - eager_out.float()).abs().max()),
        "output_abs_max": float(eager_out.float().abs().max()), "quantized_layers": ops_in_graph,
        "loadavg": os.getloadavg(), "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_cpu", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="klein-slice")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--weights-dtype", default="uint4")
    p.add_argument("--svd-rank", type=int, default=32, help="0: no SVD")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    result = run(args.size, args.dtype, args.weights_dtype, args.svd_rank, args.iters, args.threads)
    print(f"compiled / eager = {result['ratio']:.3f} (eager {result['eager_s']:.3f} s, compiled "
          f"{result['compiled_s']:.3f} s, median of {result['iters']}; compile {result['compile_s']:.1f} s; "
          f"{result['unique_graphs']} graph(s), {result['recompiles']} recompile(s), {result['graph_breaks']} graph "
          f"break(s); max |diff| {result['max_abs_diff']:.2e} of |out| <= {result['output_abs_max']:.2f})",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
