"""Dequantization throughput per width, against a ``memcpy`` of the dense weight.

For each width (integers, a mini-float, float8) a random weight is quantized with our round-to-nearest writer,
then dequantized to float32 over and over; the throughput is dense float32 bytes produced per second. The baseline
copies a float32 tensor of the same size (``dst.copy_(src)``): producing the dense weight at memcpy speed is the
most a dequantizer that writes it out can do. Two paths are timed, both bit-exact: the pure-torch codec's
``dequantize`` (whole weight at once) and the forward path's block decode (``layers.forward.RowDecoder`` over the
blocks the forward uses, into its reused workspace, with the compiled decoder when it is available, as in the
forward and in ``dequantize_weight()``: the decoded block stays in cache for the matmul).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

WIDTHS = ("uint1", "uint2", "uint3", "uint4", "int4", "uint5", "int5", "uint6", "uint7", "uint8", "int8", "uint12",
          "float5_e2m2fn", "float8_e4m3fn")


def _best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _stored(name: str, out_features: int, in_features: int, seed: int = 0):
    from diffusers_sdnq.format import plan_layer
    from diffusers_sdnq.format.config import QuantConfig
    from diffusers_sdnq.quantize import quantize_weight

    config = QuantConfig.from_dict({"quant_method": "sdnq", "weights_dtype": name})
    layout = plan_layer("linear", (out_features, in_features), config.options_for("layer.weight", "linear"))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    return layout, quantize_weight(weight, layout)


def run(out_features: int = 3072, in_features: int = 3072, repeat: int = 5,
        widths: tuple[str, ...] = WIDTHS) -> dict:
    """Throughputs in GB/s of float32 output, plus the memcpy baseline; see the module docstring."""
    from diffusers_sdnq.format import codec

    try:
        from diffusers_sdnq.layers import forward as fwd
    except ImportError:  # older checkouts have no block-wise forward
        fwd = None
    numel = out_features * in_features
    src, dst = torch.randn(numel), torch.empty(numel)
    memcpy = numel * 4 / _best_seconds(lambda: dst.copy_(src), repeat) / 1e9
    rows = []
    for name in widths:
        layout, tensors = _stored(name, out_features, in_features)
        row = {"dtype": name, "bits": layout.dtype.bits, "group_size": layout.group_size}
        secs = _best_seconds(lambda layout=layout, tensors=tensors: codec.dequantize(layout, tensors, torch.float32),
                             repeat)
        row["codec_gbs"] = numel * 4 / secs / 1e9
        align = fwd.row_alignment(layout) if fwd is not None else None
        if align is not None:
            decoder, ws = fwd.RowDecoder(layout, tensors), fwd.Workspace()
            blocks = list(fwd.row_blocks(out_features, align, in_features * 4, fwd.DEFAULT_OPTIONS.chunk_mb))

            def blockwise(decoder=decoder, ws=ws, blocks=blocks) -> None:
                for start, stop in blocks:
                    decoder.rows(start, stop, torch.float32, workspace=ws)

            row["forward_gbs"] = numel * 4 / _best_seconds(blockwise, repeat) / 1e9
        rows.append(row)
    return {"shape": [out_features, in_features], "memcpy_gbs": memcpy, "threads": torch.get_num_threads(),
            "rows": rows}


def table(result: dict) -> str:
    """Markdown table of :func:`run`'s result."""
    memcpy = result["memcpy_gbs"]
    has_fwd = any("forward_gbs" in r for r in result["rows"])
    head = "| dtype | group | codec GB/s | % memcpy |" + (" forward GB/s | % memcpy |" if has_fwd else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        line = f"| {r['dtype']} | {r['group_size']} | {r['codec_gbs']:.2f} | {100 * r['codec_gbs'] / memcpy:.0f} % |"
        if has_fwd:
            fg = r.get("forward_gbs")
            line += f" {fg:.2f} | {100 * fg / memcpy:.0f} % |" if fg else " - | - |"
        lines.append(line)
    shape = "x".join(map(str, result["shape"]))
    lines.append(f"\nmemcpy baseline (float32 {shape} copy_): {memcpy:.2f} GB/s; {result['threads']} torch threads; "
                 "throughput = dense float32 bytes produced per second (best of the repeats).")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
