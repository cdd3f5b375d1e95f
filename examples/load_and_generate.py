"""Load an SDNQ pipeline with ``DiffusionPipeline.from_pretrained`` and generate an image, fully offline.

A published SDNQ checkpoint (e.g. ``Disty0/FLUX.2-klein-4B-SDNQ-4bit-dynamic``) needs a download, so this script
first makes a tiny stand-in: a Z-Image-shaped pipeline with random weights whose transformer is quantized to uint4
by diffusers-sdnq's writer and saved. It then loads that folder exactly as you would load a Hub repo, prints how
big each component is and how long each step took, generates an image and saves it as a PNG.

    python examples/load_and_generate.py [OUTPUT_DIR]

The tiny model's weights are random, so the image is noise; what matters is that the quantized pipeline runs
and stays close to the dense one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny offline model builders

import torch  # noqa: E402
from diffusers import DiffusionPipeline, ZImageTransformer2DModel  # noqa: E402
from tiny_models import build_zimage  # noqa: E402

import diffusers_sdnq  # noqa: E402  (registers the "sdnq" backend; the start-up hook also does it when installed)
from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig  # noqa: E402

PROMPT = "a lighthouse on a cliff at dawn"
SIZE = 32  # pixels; the tiny VAE halves it twice


def make_tiny_sdnq_checkpoint(out: Path) -> tuple[Path, Path]:
    """Dense tiny pipeline in ``out/dense``; the same pipeline with a uint4 transformer in ``out/sdnq``."""
    dense, quant = out / "dense", out / "sdnq"
    build_zimage(dense, seed=0)
    config = SDNQDiffusersConfig(weights_dtype="uint4", minimum_allowed_numel=4096)  # tiny layers: lower the floor
    transformer = ZImageTransformer2DModel.from_pretrained(dense / "transformer", quantization_config=config)
    DiffusionPipeline.from_pretrained(dense, transformer=transformer).save_pretrained(quant)
    return dense, quant


def describe(folder: Path) -> None:
    """Per component: bytes of safetensors on disk and, when quantized, the SDNQ weights dtype."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in sub.glob("*.safetensors"))
        if not size:
            continue
        config = json.loads((sub / "config.json").read_text())
        quant = config.get("quantization_config") or {}
        what = f"SDNQ {quant['weights_dtype']}" if quant.get("quant_method") == "sdnq" else "dense"
        print(f"  {sub.name:<13} {size / 1024:8.1f} KiB  {what}")


def generate(pipe: DiffusionPipeline, output_type: str = "pil"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=0.0, max_sequence_length=32,
                generator=torch.Generator("cpu").manual_seed(0), output_type=output_type).images


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sdnq-load-and-generate-"))
    t0 = time.perf_counter()
    dense, folder = make_tiny_sdnq_checkpoint(out)
    print(f"made a tiny SDNQ checkpoint in {time.perf_counter() - t0:.1f}s: {folder}")
    describe(folder)

    # --- this is all a user of a published SDNQ checkpoint writes (with a repo id instead of the folder) ---
    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    print(f"from_pretrained: {time.perf_counter() - t0:.1f}s, {type(pipe).__name__}")
    t0 = time.perf_counter()
    image = generate(pipe)[0]
    image.save(out / "image.png")
    print(f"generated a {image.size[0]}x{image.size[1]} image in {time.perf_counter() - t0:.1f}s: {out / 'image.png'}")
    # --------------------------------------------------------------------------------------------------------

    layers = diffusers_sdnq.layers.sdnq_layers(pipe.transformer)
    name, layer = next(iter(layers.items()))
    stored = sum(t.numel() * t.element_size() for t in layer.sdnq_tensors().values() if t is not None)
    print(f"{len(layers)} SDNQ layers in the transformer, e.g. {name}: {layer}")
    print(f"  stores {stored} bytes for a {list(layer.dense_weight_shape)} weight "
          f"({8 * stored / layer.dense_weight_shape.numel():.2f} bits per weight, scales included); "
          f"dequantize_weight() gives {layer.dequantize_weight().dtype}")

    quantized = generate(pipe, output_type="pt")
    reference = generate(DiffusionPipeline.from_pretrained(dense, dtype=torch.bfloat16), output_type="pt")
    err = (quantized.float() - reference.float()).abs().mean().item()
    print(f"mean |uint4 - dense| over the image (values in [0, 1]): {err:.4f}")
    assert torch.isfinite(quantized.float()).all()


if __name__ == "__main__":
    main()
