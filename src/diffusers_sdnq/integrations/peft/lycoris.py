"""LoKr and LoHa (PEFT's LyCORIS tuners) on an ``SDNQLinear`` base.

Their forward is ``base_layer(x) + x @ delta.T``; the only SDNQ-specific parts are that PEFT reads
``base_layer.weight.shape`` to shape the delta (that is the *packed* shape here, so the dense shape is shown
instead) and merge/unmerge (requantizing, see :mod:`.merge`).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.loha.layer import Linear as LoHaLinear
from peft.tuners.lokr.layer import Linear as LoKrLinear

from .merge import SDNQMergeMixin


class _SDNQLycorisMixin(SDNQMergeMixin):
    def update_layer(self, adapter_name: str, r: int, alpha: float, **kwargs: Any) -> None:
        self._sdnq_name = kwargs.get("target_name", "") or getattr(self, "_sdnq_name", "")
        with self._sdnq_dense_base():
            super().update_layer(adapter_name, r, alpha, **kwargs)

    def get_delta_weight(self, adapter_name: str, *, apply_rank_dropout: bool = False) -> torch.Tensor:
        with self._sdnq_dense_base():
            return super().get_delta_weight(adapter_name, apply_rank_dropout=apply_rank_dropout)

    def _sdnq_apply_adapter(self, name: str, weight: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        return weight + self.get_delta_weight(name).to(torch.float32)


class SDNQLoKrLinear(_SDNQLycorisMixin, LoKrLinear):
    """LoKr on an ``SDNQLinear``."""

    def __repr__(self) -> str:
        return super().__repr__().replace("lokr.Linear", f"lokr.{type(self).__name__}", 1)


class SDNQLoHaLinear(_SDNQLycorisMixin, LoHaLinear):
    """LoHa on an ``SDNQLinear``."""

    def __repr__(self) -> str:
        return super().__repr__().replace("loha.Linear", f"loha.{type(self).__name__}", 1)
