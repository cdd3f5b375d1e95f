"""The benchmarked model: a FLUX.2-Klein-4B-shaped ``Flux2Transformer2DModel`` slice with seeded random weights.

Sizes are named so a run is reproducible from its command line; ``quick`` is tiny (CI smoke run), ``klein-slice``
is the issue's 1 double + 1 single block slice (563 M parameters), ``klein-full`` the full 5 + 20 block shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Size:
    """Transformer hyper-parameters and the token counts of one benchmark forward."""

    num_layers: int
    num_single_layers: int
    heads: int
    head_dim: int
    joint_attention_dim: int
    in_channels: int
    timestep_guidance_channels: int
    image_tokens: int
    text_tokens: int
    rope: tuple[int, int, int, int]
    mlp_ratio: float = 3.0

    def transformer_kwargs(self) -> dict[str, Any]:
        return {
            "patch_size": 1,
            "in_channels": self.in_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.head_dim,
            "num_attention_heads": self.heads,
            "joint_attention_dim": self.joint_attention_dim,
            "timestep_guidance_channels": self.timestep_guidance_channels,
            "mlp_ratio": self.mlp_ratio,
            "axes_dims_rope": self.rope,
            "guidance_embeds": False,
        }


SIZES: dict[str, Size] = {
    "quick": Size(1, 1, 4, 32, 96, 32, 64, 32, 16, (8, 8, 8, 8)),
    "klein-slice": Size(1, 1, 24, 128, 7680, 128, 256, 128, 64, (32, 32, 32, 32)),
    "klein-full": Size(5, 20, 24, 128, 7680, 128, 256, 128, 64, (32, 32, 32, 32)),
}


#: Sparse (1 %) outlier magnitude of matrix ``i`` by ``i % 3``: plain, 4x, 8x. Layers then differ in quantization
#: loss, so dynamic quantization (threshold 0.01) mixes uint4 (plain), int5 (4x) and float5_e2m2fn (8x).
OUTLIERS = (1.0, 4.0, 8.0)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 1/fan_in) matrices with the sparse outliers of :data:`OUTLIERS`; norms ~1, biases ~0."""
    gen = torch.Generator().manual_seed(seed)
    index = 0
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if param.ndim >= 2:
            fan_in = param.shape[1:].numel()
            for rows in torch.split(torch.arange(param.shape[0]), 4096):  # bounded temporaries for big matrices
                value = torch.randn((len(rows), *param.shape[1:]), generator=gen) / fan_in**0.5
                magnitude = OUTLIERS[index % len(OUTLIERS)]
                if magnitude != 1.0:
                    value = torch.where(torch.rand(value.shape, generator=gen) < 0.01, value * magnitude, value)
                param[rows[0]: rows[-1] + 1].copy_(value)
            index += 1
        elif name.endswith("bias"):
            param.copy_(0.02 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))


def build_dense(size: Size, path: Path, seed: int = 0) -> None:
    """Save the dense model in bfloat16 (the dtype real FLUX.2 checkpoints ship in)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: klein-full in float32 alone would take 16 GB
    try:
        model = Flux2Transformer2DModel(**size.transformer_kwargs())
    finally:
        torch.set_default_dtype(previous)
    randomize_(model, seed)
    model.save_pretrained(str(path), max_shard_size="20GB")


def make_inputs(size: Size, seed: int = 1) -> dict[str, torch.Tensor]:
    """One denoising step's inputs (float32; the child casts them to the model dtype)."""
    gen = torch.Generator().manual_seed(seed)
    side = int(size.image_tokens**0.5)
    while size.image_tokens % side:
        side -= 1
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(size.image_tokens // side), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(size.image_tokens, 1), grid.reshape(-1, 2).float(),
                         torch.zeros(size.image_tokens, 1)], -1)
    txt_ids = torch.zeros(size.text_tokens, 4)
    txt_ids[:, 3] = torch.arange(size.text_tokens).float()
    return {
        "hidden_states": torch.randn(1, size.image_tokens, size.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, size.text_tokens, size.joint_attention_dim, generator=gen),
        "timestep": torch.tensor([0.7]),
        "img_ids": img_ids.unsqueeze(0),
        "txt_ids": txt_ids.unsqueeze(0),
    }
