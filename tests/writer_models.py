"""A small diffusers model with every layer kind the SDNQ writer handles, for writer round-trip tests.

``WriterToy`` is importable by name (``writer_models.WriterToy``) so that the reference, running in a child
process, can ``from_pretrained`` the folders our writer saves. Its weights are deterministic and of three kinds:
Gaussian with sparse outliers, low-rank plus noise (what trained layers look like), and uniform; its forward
uses every layer so outputs compare whole-model behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

#: Fixed inputs of the forward comparison.
IDS_SHAPE = (2, 5)
IMAGE_SHAPE = (1, 32, 6, 6)


class Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width, bias=False)
        self.gate = nn.Linear(width, 160)
        self.odd = nn.Linear(160, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        x = x + self.down(torch.nn.functional.gelu(h))
        return x + self.odd(torch.tanh(self.gate(x)))


class WriterToy(ModelMixin, ConfigMixin):
    """Embedding → root ``proj_in`` (a generic skip key) → two blocks → ``head`` (out 40: no quantized matmul);
    a Conv2d / ConvTranspose2d branch on an image input."""

    @register_to_config
    def __init__(self, vocab: int = 96, width: int = 128, hidden: int = 256, channels: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj_in = nn.Linear(width, width)
        self.blocks = nn.ModuleList([Block(width, hidden) for _ in range(2)])
        self.head = nn.Linear(width, 40)
        self.conv = nn.Conv2d(channels, 64, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(64, 64, 3)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj_in(self.embed(ids))
        for block in self.blocks:
            x = block(x)
        return self.head(x), self.deconv(torch.relu(self.conv(image)))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights: every 3rd matrix low-rank + noise, every 3rd Gaussian with 1% 8x outliers, the rest
    uniform; biases small, norm weights near 1."""
    gen = torch.Generator().manual_seed(seed)
    for i, (name, p) in enumerate(sorted(model.named_parameters(), key=lambda kv: kv[0])):
        if p.ndim >= 2:
            rows, cols = p.shape[0], p[0].numel()
            kind = i % 3
            if kind == 0:
                rank = 8
                a = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) / rank
                value = (a + 0.1 * torch.randn(rows, cols, generator=gen)) / cols**0.5
            elif kind == 1:
                value = torch.randn(rows, cols, generator=gen) / cols**0.5
                value = torch.where(torch.rand(rows, cols, generator=gen) < 0.01, value * 8, value)
            else:
                value = (torch.rand(rows, cols, generator=gen) * 2 - 1) / cols**0.5
            p.copy_(value.reshape(p.shape))
        elif name.endswith("bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"ids": torch.randint(0, 96, IDS_SHAPE, generator=gen), "image": torch.randn(IMAGE_SHAPE, generator=gen)}


def build_dense(path: str | os.PathLike) -> Path:
    """Save the dense ``WriterToy`` to ``path`` (built once; reused when present)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        init_weights(WriterToy()).save_pretrained(str(tmp))
        tmp.rename(path)
    return path
