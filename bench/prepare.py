"""Build the dense benchmark model and quantize it with the reference ``sdnq`` (run as one child process).

``python -m bench.prepare SIZE WORKDIR VARIANT...``: writes ``WORKDIR/dense`` (bf16 checkpoint),
``WORKDIR/inputs.safetensors`` and ``WORKDIR/<variant>`` for every variant not there yet, each built in a
temporary folder and renamed into place. The reference registers itself into diffusers/transformers when imported,
so it only ever runs here, in its own interpreter, never next to ours.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

#: Reference ``sdnq_post_load_quant`` keyword arguments per variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "uint4_svd": {"weights_dtype": "uint4", "use_svd": True, "svd_rank": 32},
    # with the outliers of model.OUTLIERS this threshold mixes uint4, int5 and float5_e2m2fn layers
    "dynamic": {"weights_dtype": "uint4", "use_dynamic_quantization": True, "dynamic_loss_threshold": 0.01},
    "int8": {"weights_dtype": "int8"},
    # issue 17: int8 written for the quantized matmul (row-wise codes stored transposed, used as they are)
    "int8_qmm": {"weights_dtype": "int8", "use_quantized_matmul": True},
}


def quantize(dense: Path, out: Path, variant: str, minimum_numel: int | None) -> dict[str, Any]:
    """Quantize ``dense`` with the reference and save it to ``out`` with ``save_sdnq_model``."""
    import sdnq
    import torch
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(str(dense), torch_dtype=torch.bfloat16)
    torch.manual_seed(0)  # the randomized low-rank SVD is seeded
    kwargs = dict(VARIANTS[variant])
    if minimum_numel is not None:
        kwargs["minimum_allowed_numel"] = minimum_numel
    t0 = time.perf_counter()
    sdnq.sdnq_post_load_quant(model, **kwargs)
    seconds = time.perf_counter() - t0
    dtypes: dict[str, int] = {}
    for module in model.modules():
        if hasattr(module, "sdnq_dequantizer"):
            name = module.sdnq_dequantizer.weights_dtype
            dtypes[name] = dtypes.get(name, 0) + 1
    sdnq.save_sdnq_model(model, str(out))
    return {"variant": variant, "kwargs": kwargs, "seconds": round(seconds, 1), "dtypes": dtypes}


def main(argv: list[str]) -> int:
    size_name, work, variants = argv[0], Path(argv[1]), argv[2:]
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
    from safetensors.torch import save_file

    from .model import SIZES, build_dense, make_inputs

    size = SIZES[size_name]
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "dense"
    if not (dense / "config.json").is_file():
        tmp = work / "tmp-dense"
        shutil.rmtree(tmp, ignore_errors=True)
        build_dense(size, tmp)
        save_file(make_inputs(size), str(work / "inputs.safetensors"))
        tmp.rename(dense)
    for variant in variants:
        target = work / variant
        if (target / "bench_summary.json").is_file():
            continue
        tmp = work / f"tmp-{variant}"
        shutil.rmtree(tmp, ignore_errors=True)
        summary = quantize(dense, tmp, variant, 4096 if size_name == "quick" else None)
        (tmp / "bench_summary.json").write_text(json.dumps(summary))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
