"""Quick start, fully offline: quantize a tiny FLUX.2-Klein-shaped pipeline's transformer and Qwen3 text encoder
to uint4 (round-to-nearest, per-group scales), save it, load it back through ``from_pretrained`` with
diffusers-sdnq, and generate a small image.

    python examples/quickstart.py [OUTPUT_DIR]

Real checkpoints load the same way, e.g.
``Flux2KleinPipeline.from_pretrained("Disty0/FLUX.2-klein-4B-SDNQ-4bit-dynamic")`` after ``import diffusers_sdnq``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny offline model builders

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from diffusers.quantizers import PipelineQuantizationConfig  # noqa: E402
from tiny_models import build_flux2_klein, run_pipeline  # noqa: E402

import diffusers_sdnq  # noqa: E402,F401  (registers the "sdnq" backend)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sdnq-quickstart-"))
    dense, quant = out / "dense", out / "uint4"
    torch.manual_seed(0)
    build_flux2_klein(dense)

    t0 = time.perf_counter()
    config = PipelineQuantizationConfig(
        quant_backend="sdnq",
        quant_kwargs={"weights_dtype": "uint4", "minimum_allowed_numel": 4096},  # tiny layers: lower the floor
        components_to_quantize=["transformer", "text_encoder"],
    )
    pipe = DiffusionPipeline.from_pretrained(dense, quantization_config=config)
    pipe.save_pretrained(quant)
    sizes = ", ".join(f"{c} {folder_bytes(dense / c)} -> {folder_bytes(quant / c)} bytes"
                      for c in ("transformer", "text_encoder"))
    print(f"quantized + saved in {time.perf_counter() - t0:.1f}s: {sizes}")

    t0 = time.perf_counter()
    loaded = DiffusionPipeline.from_pretrained(quant)
    layers = diffusers_sdnq.layers.sdnq_layers(loaded.transformer)
    encoder_layers = diffusers_sdnq.layers.sdnq_layers(loaded.text_encoder)
    assert layers and encoder_layers, "both components should load quantized"
    print(f"loaded in {time.perf_counter() - t0:.1f}s with {len(layers)} SDNQ layers in the transformer and "
          f"{len(encoder_layers)} in the text encoder, e.g. {next(iter(layers.values()))}")

    t0 = time.perf_counter()
    image = run_pipeline(loaded, seed=0, output_type="pt")
    reference = run_pipeline(DiffusionPipeline.from_pretrained(dense), seed=0, output_type="pt")
    err = (image - reference).abs().mean().item()
    print(f"generated {tuple(image.shape)} in {time.perf_counter() - t0:.1f}s; mean |uint4 - dense| = {err:.4f}")
    assert torch.isfinite(image).all()


if __name__ == "__main__":
    main()
