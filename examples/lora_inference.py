"""LoRA inference on an SDNQ pipeline, fully offline on a tiny FLUX.2-Klein-shaped pipeline.

    python examples/lora_inference.py [OUTPUT_DIR]

Builds a dense tiny pipeline, quantizes its transformer to uint4 with diffusers-sdnq, makes two LoRAs on the
*dense* transformer (one saved in diffusers format, one in the BFL/ai-toolkit layout community FLUX.2 LoRAs use)
and then runs the usual diffusers LoRA API on the quantized pipeline: load, weighted multi-adapter, disable /
enable, fuse / unfuse, unload. Each step is compared with the same LoRA on the dense-dequantized twin.
Real checkpoints work the same way, e.g. ``pipe.load_lora_weights("some/flux2-klein-lora")``.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny offline model builders

import torch  # noqa: E402
from diffusers import DiffusionPipeline, Flux2Transformer2DModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import build_flux2_klein, run_pipeline  # noqa: E402

import diffusers_sdnq  # noqa: E402  (registers the "sdnq" backend and the PEFT adapters)
from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig  # noqa: E402
from diffusers_sdnq.integrations.peft import fuse_blockers  # noqa: E402


def make_dense_lora(dense_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA on the dense transformer's attention and MLP layers (stands in for a trained one)."""
    transformer = Flux2Transformer2DModel.from_pretrained(dense_dir / "transformer")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "linear_in", "linear_out", "to_qkv_mlp_proj"]
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return get_peft_model_state_dict(transformer)


def bfl_lora(seed: int) -> dict[str, torch.Tensor]:
    """The same kind of file in the BFL key layout (fused qkv), which diffusers converts on load."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"double_blocks.0.img_attn.qkv": (384, 128), "double_blocks.0.img_attn.proj": (128, 128),
              "single_blocks.0.linear1": (1152, 128), "single_blocks.0.linear2": (128, 512)}
    out = {}
    for key, (out_f, in_f) in shapes.items():
        out[f"diffusion_model.{key}.lora_A.weight"] = torch.randn(4, in_f, generator=gen) / in_f**0.5
        out[f"diffusion_model.{key}.lora_B.weight"] = 0.05 * torch.randn(out_f, 4, generator=gen)
    return out


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sdnq-lora-"))
    dense_dir, quant_dir = out / "dense", out / "uint4"
    torch.manual_seed(0)
    build_flux2_klein(dense_dir)
    config = SDNQDiffusersConfig(weights_dtype="uint4", minimum_allowed_numel=4096)
    transformer = Flux2Transformer2DModel.from_pretrained(dense_dir / "transformer", quantization_config=config)
    DiffusionPipeline.from_pretrained(dense_dir, transformer=transformer).save_pretrained(quant_dir)

    pipe = DiffusionPipeline.from_pretrained(quant_dir)
    twin = copy.deepcopy(pipe)  # reference: same weights, dequantized, through PEFT's dense layers
    diffusers_sdnq.dequantize_model(twin.transformer)
    type(pipe).save_lora_weights(out / "style", transformer_lora_layers=make_dense_lora(dense_dir, seed=1))
    save_file(bfl_lora(seed=2), str(out / "detail_bfl.safetensors"))

    base = run_pipeline(pipe)
    for p in (pipe, twin):
        p.load_lora_weights(out / "style", adapter_name="style")
        p.load_lora_weights(out / "detail_bfl.safetensors", adapter_name="detail")
        p.set_adapters(["style", "detail"], adapter_weights=[0.8, 0.5])
    mixed, ref = run_pipeline(pipe), run_pipeline(twin)
    print(f"two adapters: effect {(mixed - base).abs().max():.3f}, max |sdnq - dense twin| = "
          f"{(mixed - ref).abs().max():.2e}")

    pipe.disable_lora()
    print("disable_lora -> LoRA-free output:", torch.equal(run_pipeline(pipe), base))
    pipe.enable_lora()

    print("layers that cannot be fused:", fuse_blockers(pipe.transformer) or "none")
    pipe.fuse_lora()  # dequantize -> add the deltas -> requantize to uint4, original bytes kept aside
    fused = run_pipeline(pipe)
    print(f"fused: max |fused - unfused| = {(fused - mixed).abs().max():.3f} (uint4 requantization)")
    pipe.unfuse_lora()  # restores the original packed bytes exactly
    print(f"unfused: max |unfused - before fuse| = {(run_pipeline(pipe) - mixed).abs().max():.2e}")

    pipe.unload_lora_weights()
    print("unloaded -> LoRA-free output:", torch.equal(run_pipeline(pipe), base))


if __name__ == "__main__":
    main()
