"""Offloading SDNQ pipelines: ``enable_model_cpu_offload``, ``enable_sequential_cpu_offload`` and diffusers' group
offloading (block and leaf level, with and without CUDA streams).

Oracle: the same pipeline without offloading, on the same device (the offloading hooks move tensors; they must not
change a single output bit on CPU). On CPU the hooks run with the CPU as the "accelerator" where the libraries allow
it: model offload and group offload do. Sequential offload and group offload to disk give wrong results or fail on
a CPU-only machine for the *dense* pipeline too (accelerate / diffusers, not SDNQ; checked with the dense fixture),
and CUDA streams need a GPU: those run in the GPU-marked tests (and in ``python -m bench --gpu``, which also
measures peak GPU memory).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cache_root
from tiny_models import get_fixture, run_pipeline

import diffusers_sdnq  # noqa: F401  (registers the backend)
from diffusers_sdnq.layers import SDNQLayerMixin

FIXTURES = [("flux2_klein", "uint4_svd"), ("zimage", "dynamic")]


@pytest.fixture(scope="module")
def folders() -> dict[tuple[str, str], Path]:
    return {key: get_fixture(*key, cache_root() / "models") for key in FIXTURES}


@pytest.fixture(scope="module")
def baselines(folders) -> dict[tuple[str, str], torch.Tensor]:
    from diffusers import DiffusionPipeline

    return {key: run_pipeline(DiffusionPipeline.from_pretrained(folder)) for key, folder in folders.items()}


def _pipe(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    assert any(isinstance(m, SDNQLayerMixin) for m in pipe.transformer.modules())
    return pipe


def _group(offload_type: str, onload: str, **kwargs):
    options = {"onload_device": torch.device(onload), "offload_device": torch.device("cpu"),
               "offload_type": offload_type, **kwargs}
    if offload_type == "block_level":
        options.setdefault("num_blocks_per_group", 1)
    return lambda pipe: pipe.enable_group_offload(**options)


CPU_MODES = {
    "model": lambda pipe: pipe.enable_model_cpu_offload(device="cpu"),
    "group_block": _group("block_level", "cpu"),
    "group_block_2": _group("block_level", "cpu", num_blocks_per_group=2),
    "group_leaf": _group("leaf_level", "cpu"),
    "group_leaf_low_mem": _group("leaf_level", "cpu", low_cpu_mem_usage=True),
}


#: each mode once, over the two pipelines (each case loads and runs a pipeline twice)
CPU_CASES = [(FIXTURES[0], "model"), (FIXTURES[0], "group_block"), (FIXTURES[0], "group_leaf_low_mem"),
             (FIXTURES[1], "group_block_2"), (FIXTURES[1], "group_leaf")]


@pytest.mark.parametrize(("key", "mode"), CPU_CASES, ids=[f"{k[0]}-{m}" for k, m in CPU_CASES])
def test_offloaded_pipeline_equals_the_plain_one_on_cpu(folders, baselines, key, mode: str) -> None:
    pipe = _pipe(folders[key])
    dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    CPU_MODES[mode](pipe)
    hooked = [m for m in pipe.transformer.modules() if getattr(m, "_diffusers_hook", None) is not None
              or getattr(m, "_hf_hook", None) is not None]
    assert hooked, f"{mode}: no offloading hook was installed"
    for _ in range(2):  # the second run starts from the offloaded state the first one left
        out = run_pipeline(pipe)
        assert torch.equal(out, baselines[key]), (mode, (out - baselines[key]).abs().max())
    assert {n: p.dtype for n, p in pipe.transformer.named_parameters()} == dtypes  # codes stay codes


# -------------------------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_MODES = {
    "model": lambda pipe: pipe.enable_model_cpu_offload(),
    "sequential": lambda pipe: pipe.enable_sequential_cpu_offload(),
    "group_block": _group("block_level", "cuda"),
    "group_block_stream": _group("block_level", "cuda", use_stream=True),
    "group_leaf": _group("leaf_level", "cuda"),
    "group_leaf_stream": _group("leaf_level", "cuda", use_stream=True),
    "group_leaf_stream_record": _group("leaf_level", "cuda", use_stream=True, record_stream=True,
                                       low_cpu_mem_usage=True),
}


@pytest.fixture(scope="module")
def cuda_baselines(folders) -> dict[tuple[str, str], torch.Tensor]:
    return {key: run_pipeline(_pipe(folder).to("cuda")) for key, folder in folders.items()}


@needs_cuda
@pytest.mark.parametrize("key", FIXTURES, ids=lambda k: "-".join(k))
@pytest.mark.parametrize("mode", list(GPU_MODES))
def test_offloaded_pipeline_equals_the_plain_one_on_cuda(folders, cuda_baselines, key, mode: str) -> None:
    pipe = _pipe(folders[key])
    GPU_MODES[mode](pipe)
    for _ in range(2):
        out = run_pipeline(pipe)
        torch.testing.assert_close(out, cuda_baselines[key], rtol=1e-5, atol=1e-5)
    if mode != "model":  # after a run the layers are back off the GPU
        assert all(m.weight.device.type != "cuda" for m in pipe.transformer.modules()
                   if isinstance(m, SDNQLayerMixin))
