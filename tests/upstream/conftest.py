"""The ported upstream suites run their tiny models on one torch thread (as upstream's CPU runners do): fewer
threads than cores keeps the many small forwards from contending on the 2-core CI machine."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
