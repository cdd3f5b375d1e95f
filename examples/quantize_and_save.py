"""Make your own SDNQ checkpoints, fully offline, on a tiny FLUX.2-Klein-shaped pipeline.

    python examples/quantize_and_save.py [OUTPUT_DIR]

1. one component: ``from_pretrained(dense, quantization_config=SDNQConfig(...))`` quantizes each layer as
   it is read (here uint4 + SVD rank 8), ``save_pretrained`` writes the checkpoint;
2. a whole pipeline: ``PipelineQuantizationConfig(quant_backend="sdnq", ...)`` quantizes the diffusers transformer
   and the transformers text encoder in one call (here with dynamic mixed precision);
3. a model already in memory: ``quantize_model(model, weights_dtype=...)``.

The folders load anywhere SDNQ loads (this package, the reference ``sdnq`` library, SD.Next).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny offline model builders

import torch  # noqa: E402
from diffusers import DiffusionPipeline, Flux2Transformer2DModel  # noqa: E402
from diffusers.quantizers import PipelineQuantizationConfig  # noqa: E402
from tiny_models import build_flux2_klein, run_pipeline  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import diffusers_sdnq  # noqa: E402,F401  (registers the "sdnq" backend)
from diffusers_sdnq import SDNQConfig  # noqa: E402
from diffusers_sdnq.layers import sdnq_layers  # noqa: E402
from diffusers_sdnq.quantize import quantize_model  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sdnq-quantize-"))
    dense = out / "dense"
    torch.manual_seed(0)
    build_flux2_klein(dense)
    # the tiny test layers are small; real models keep the default minimum_allowed_numel (16384)
    small = {"minimum_allowed_numel": 4096}

    # 1. one component, quantized while loading
    t0 = time.perf_counter()
    config = SDNQConfig(weights_dtype="uint4", use_svd=True, svd_rank=8, **small)
    transformer = Flux2Transformer2DModel.from_pretrained(dense / "transformer", quantization_config=config)
    transformer.save_pretrained(out / "transformer-uint4-svd")
    saved = json.loads((out / "transformer-uint4-svd" / "config.json").read_text())["quantization_config"]
    print(f"1. transformer: {len(sdnq_layers(transformer))} layers quantized in {time.perf_counter() - t0:.1f}s, "
          f"{folder_bytes(dense / 'transformer')} -> {folder_bytes(out / 'transformer-uint4-svd')} bytes; "
          f"files: {sorted(p.name for p in (out / 'transformer-uint4-svd').iterdir())}; "
          f"{len(saved['modules_to_not_convert'])} entries in modules_to_not_convert")

    # 2. a pipeline: diffusers and transformers components in one call, dynamic mixed precision
    t0 = time.perf_counter()
    pipeline_config = PipelineQuantizationConfig(
        quant_backend="sdnq",
        quant_kwargs={"weights_dtype": "uint4", "use_dynamic_quantization": True, "dynamic_loss_threshold": 0.008,
                      **small},
        components_to_quantize=["transformer", "text_encoder"],
    )
    pipe = DiffusionPipeline.from_pretrained(dense, quantization_config=pipeline_config)
    pipe.save_pretrained(out / "pipeline-dynamic")
    for comp in ("transformer", "text_encoder"):
        chosen = Counter(layer.sdnq_layout.dtype.name for layer in sdnq_layers(getattr(pipe, comp)).values())
        print(f"2. {comp}: dynamic choices {dict(chosen)}")
    print(f"   pipeline quantized + saved in {time.perf_counter() - t0:.1f}s")

    loaded = DiffusionPipeline.from_pretrained(out / "pipeline-dynamic")
    image = run_pipeline(loaded, seed=0, output_type="pt")
    reference = run_pipeline(DiffusionPipeline.from_pretrained(dense), seed=0, output_type="pt")
    print(f"   reloaded and generated {tuple(image.shape)}; mean |quantized - dense| = "
          f"{(image - reference).abs().mean().item():.4f}")
    assert torch.isfinite(image).all()

    # 3. a model already in memory
    encoder = AutoModelForCausalLM.from_pretrained(dense / "text_encoder")
    quantize_model(encoder, weights_dtype="int8", **small)
    encoder.save_pretrained(out / "text-encoder-int8")
    print(f"3. text encoder (in memory): {len(sdnq_layers(encoder))} int8 layers, saved to {out / 'text-encoder-int8'}")


if __name__ == "__main__":
    main()
