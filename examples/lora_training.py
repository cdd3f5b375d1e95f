"""QLoRA-style training on an SDNQ transformer, fully offline on a tiny FLUX.2-Klein-shaped pipeline.

    python examples/lora_training.py [OUTPUT_DIR]

The transformer is quantized to uint4 (frozen, packed); a LoRA on its attention/MLP layers is trained with a
flow-matching loss on one cached latent/prompt pair, saved in diffusers format and loaded into a freshly
loaded SDNQ pipeline. Prints the loss before/after and checks that the stored quantized tensors did not move.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny offline model builders

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DiffusionPipeline, Flux2Transformer2DModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from tiny_models import PROMPT, build_flux2_klein, run_pipeline  # noqa: E402

import diffusers_sdnq  # noqa: E402,F401  (registers the "sdnq" backend and the PEFT adapters)
from diffusers_sdnq.integrations.diffusers import SDNQDiffusersConfig  # noqa: E402
from diffusers_sdnq.integrations.peft import prepare_model_for_sdnq_training, sdnq_stored_tensors  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sdnq-lora-train-"))
    dense_dir, quant_dir = out / "dense", out / "uint4"
    torch.manual_seed(0)
    build_flux2_klein(dense_dir)
    config = SDNQDiffusersConfig(weights_dtype="uint4", minimum_allowed_numel=4096)
    transformer = Flux2Transformer2DModel.from_pretrained(dense_dir / "transformer", quantization_config=config)
    DiffusionPipeline.from_pretrained(dense_dir, transformer=transformer).save_pretrained(quant_dir)

    pipe = DiffusionPipeline.from_pretrained(quant_dir)
    with torch.no_grad():  # cache the conditioning once; only the transformer is trained
        prompt_embeds, text_ids = pipe.encode_prompt(PROMPT, max_sequence_length=32)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=gen)  # (batch, channels, h, w) after the 2x2 patchify
    latent_ids = pipe._prepare_latent_ids(latents)
    x0 = pipe._pack_latents(latents)

    transformer = prepare_model_for_sdnq_training(pipe.transformer)  # frozen; stored tensors untouched
    before = {k: v.clone() for k, v in sdnq_stored_tensors(transformer).items()}
    targets = ["to_q", "to_k", "to_v", "to_out.0", "linear_in", "linear_out", "to_qkv_mlp_proj"]
    transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in transformer.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in params)} (adapters only)")
    opt = torch.optim.AdamW(params, lr=5e-3)
    transformer.train()
    losses = []
    for step in range(40):
        t = torch.rand(1, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t) * x0 + t * noise
        pred = transformer(hidden_states=xt, encoder_hidden_states=prompt_embeds, timestep=t, img_ids=latent_ids,
                           txt_ids=text_ids, guidance=None).sample
        loss = F.mse_loss(pred, noise - x0)  # flow-matching velocity target
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == 39:
            print(f"step {step:2d} loss {loss.item():.4f}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"mean loss first 5 steps {first:.4f} -> last 5 steps {last:.4f}")
    after = sdnq_stored_tensors(transformer)
    print("quantized base unchanged (bytes):", all(torch.equal(before[k], after[k]) for k in before))

    type(pipe).save_lora_weights(out / "trained_lora", transformer_lora_layers=get_peft_model_state_dict(transformer))
    fresh = DiffusionPipeline.from_pretrained(quant_dir)
    base = run_pipeline(fresh)
    fresh.load_lora_weights(out / "trained_lora")
    print(f"reloaded LoRA changes the output by {(run_pipeline(fresh) - base).abs().max():.3f}; saved in "
          f"{out / 'trained_lora'}")


if __name__ == "__main__":
    main()
