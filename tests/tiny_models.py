"""Tiny, offline, randomly initialised models and pipelines for the test-suite.

Everything here is built from scratch (configs + tokenizers made with the ``tokenizers`` library), so no network
access is needed.  The module also produces *reference* SDNQ checkpoints by calling the public API of the ``sdnq``
package, which is used strictly as a black-box test oracle.

Importing ``sdnq`` registers a global ``"sdnq"`` quantizer inside diffusers/transformers, which could mask our own
integration.  Therefore this module never imports ``sdnq`` at import time, and :func:`get_fixture` runs the
reference quantization in a child process by default (``isolate=True``), keeping the test process clean.

Fixture names: ``"flux2_klein"``, ``"zimage"``, ``"flux1"``, ``"qwen3"`` (a bare ``Qwen3ForCausalLM`` folder).
Variants: ``"dense"`` plus the keys of :data:`VARIANTS` (``"uint4_svd"``, ``"dynamic"``, ``"int8"``).

All linears that should be quantized are at least 32 input channels wide.  The reference skips layers with fewer than
``minimum_allowed_numel`` (default 16384) elements; the tiny text encoders use 64-wide layers (4096 elements), so
:func:`quantize_with_reference` passes ``minimum_allowed_numel=MIN_NUMEL`` (4096) unless the caller overrides it.
Some layers (e.g. Qwen3 ``k_proj``/``v_proj`` with one 32-wide KV head = 2048 elements) stay below it on purpose,
so every checkpoint also contains numel-skipped linears.

Reference behaviour worth knowing: embeddings are never quantized (``quant_embedding=False``); tied ``lm_head``
(Qwen3) is listed in ``modules_to_not_convert`` and not saved; T5 ``wo`` layers are skipped by the reference's own
skip keys, and of the tied ``shared``/``encoder.embed_tokens`` pair only ``shared.weight`` is saved.

Typical use from a test::

    @pytest.fixture(scope="session")
    def flux2_uint4(tmp_path_factory):
        return get_fixture("flux2_klein", "uint4_svd", tmp_path_factory.getbasetemp() / "tiny")

Command line (also used for the isolated child process)::

    python tests/tiny_models.py ROOT [NAME ...] [--variants dense uint4_svd ...] [--verify]
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

#: Bump when builders change so stale cached fixtures are rebuilt.
FIXTURE_VERSION = 1
#: ``minimum_allowed_numel`` passed to the reference by default (its own default is 16384).
MIN_NUMEL = 4096
#: Prompt used by :func:`run_pipeline`.
PROMPT = "a tiny red cat"
#: Short text length used by :func:`run_pipeline` (the pipelines default to 512).
MAX_SEQUENCE_LENGTH = 32
#: Image side in pixels; every tiny VAE has a scale factor of 2 (two blocks), so this gives 16x16 latents.
IMAGE_SIZE = 32

FIXTURE_NAMES: tuple[str, ...] = ("flux2_klein", "zimage", "flux1", "qwen3")

#: Reference quantization kwargs per variant (``minimum_allowed_numel`` is added by quantize_with_reference).
VARIANTS: dict[str, dict[str, Any]] = {
    "uint4_svd": {"weights_dtype": "uint4", "use_svd": True, "svd_rank": 8},
    # _randomize_ gives every third matrix sparse 8x outliers, so per-layer uint4 loss varies; with this threshold
    # every transformer ends up MIXED: uint4 + int5 + float5_e2m2fn (Z-Image also one int6).
    "dynamic": {"weights_dtype": "uint4", "use_dynamic_quantization": True, "dynamic_loss_threshold": 0.008},
    "int8": {"weights_dtype": "int8"},
}

#: Components quantized per fixture name (the bare LM folder is quantized as a whole).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "flux2_klein": ("transformer", "text_encoder"),
    "zimage": ("transformer", "text_encoder"),
    "flux1": ("transformer", "text_encoder", "text_encoder_2"),
    "qwen3": (),
}

# --------------------------------------------------------------------------------------------------------------------
# random init
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int, outlier_every: int = 3) -> torch.nn.Module:
    """Deterministically re-initialise every floating-point parameter of ``model`` (tied ones once).

    Matrices get N(0, 1/fan_in); every ``outlier_every``-th matrix (in name order) additionally gets ~1% sparse
    outliers of 8x magnitude so that quantization error differs between layers.  1-D weights (norm scales) get
    1 + 0.1*N, biases 0.02*N.  Nothing is left zero-initialised (diffusers zero-inits some output projections).
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    matrix_idx = 0
    for name, param in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        if id(param) in seen or not param.is_floating_point():
            continue
        seen.add(id(param))
        shape = param.shape
        if param.ndim >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            value = torch.randn(shape, generator=gen) / fan_in**0.5
            if outlier_every and matrix_idx % outlier_every == 0:
                mask = torch.rand(shape, generator=gen) < 0.01
                value = torch.where(mask, value * 8.0, value)
            matrix_idx += 1
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(shape, generator=gen)
        else:
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        param.copy_(value.to(param.dtype))
    return model


# --------------------------------------------------------------------------------------------------------------------
# tokenizers (built from scratch, offline)
# --------------------------------------------------------------------------------------------------------------------

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_QWEN_MERGES = (("Ġ", "a"), ("Ġ", "t"), ("Ġ", "c"), ("h", "e"), ("i", "n"), ("a", "t"), ("Ġc", "at"), ("Ġt", "in"))


def _byte_alphabet() -> list[str]:
    """The 256 GPT-2 byte-level symbols, in byte order (printable bytes map to themselves, others to 256+i)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def build_qwen_tokenizer() -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` (~270 tokens) with a Qwen3-style chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for tok in (*_QWEN_SPECIALS, *_byte_alphabet(), *("".join(m) for m in _QWEN_MERGES)):
        vocab.setdefault(tok, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(_QWEN_MERGES), model_max_length=4096)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIALS[1:]])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_clip_tokenizer(model_max_length: int = MAX_SEQUENCE_LENGTH) -> Any:
    """A byte-level BPE ``CLIPTokenizer`` over printable ASCII (plus ``</w>`` word-final forms)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for b in range(33, 127):
        vocab.setdefault(alphabet[b], len(vocab))
        vocab.setdefault(alphabet[b] + "</w>", len(vocab))
    merges = [("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_t5_tokenizer() -> Any:
    """A Unigram ``T5Tokenizer`` over lowercase ASCII with no sentinel tokens."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    pieces += [(c, -4.0) for c in chars]
    pieces += [("▁" + c, -3.0) for c in chars]
    pieces += [(w, -1.0) for w in ("▁a", "▁cat", "▁red", "▁tiny", "▁dog")]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=4096)


# --------------------------------------------------------------------------------------------------------------------
# model builders
# --------------------------------------------------------------------------------------------------------------------


def _qwen3_config(num_hidden_layers: int, tie_word_embeddings: bool, vocab_size: int = 288) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=2,  # <|im_end|>
        pad_token_id=0,  # <|endoftext|>
    )


def _qwen3(num_hidden_layers: int, tie_word_embeddings: bool, seed: int) -> Any:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(_qwen3_config(num_hidden_layers, tie_word_embeddings))
    _randomize_(model, seed)
    if tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _vae_config() -> dict[str, Any]:
    """Two-block VAE config (spatial scale factor 2, 4 latent channels)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": IMAGE_SIZE,
    }


def _flux2_vae(seed: int) -> Any:
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**_vae_config(), patch_size=(2, 2))
    _randomize_(vae, seed, outlier_every=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(1.0 + 0.1 * torch.rand(vae.bn.running_var.shape, generator=gen))
    return vae.eval()


def _kl_vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**_vae_config(), scaling_factor=0.5, shift_factor=0.1)
    _randomize_(vae, seed, outlier_every=0)
    return vae.eval()


def _flow_scheduler(dynamic: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=dynamic,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_flux2_klein(path: str | os.PathLike[str], seed: int = 0) -> None:
    """Save a tiny ``Flux2KleinPipeline`` to ``path``.

    Transformer: 128 wide (4 heads x 32), 1 double + 1 single block, ``in_channels=16`` (4 latent channels x 2x2
    patch).  Text encoder: tied ``Qwen3ForCausalLM`` (hidden 64) with 27 layers, because the pipeline stacks hidden
    states (9, 18, 27) by default, hence ``joint_attention_dim = 3 * 64``.
    """
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=3 * 64,
        timestep_guidance_channels=64,
        mlp_ratio=3.0,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=False,
    )
    _randomize_(transformer, seed + 1)
    pipe = Flux2KleinPipeline(
        scheduler=_flow_scheduler(dynamic=True),
        vae=_flux2_vae(seed + 2),
        text_encoder=_qwen3(num_hidden_layers=27, tie_word_embeddings=True, seed=seed + 3),
        tokenizer=build_qwen_tokenizer(),
        transformer=transformer.eval(),
        is_distilled=False,
    )
    pipe.save_pretrained(str(path))


def build_zimage(path: str | os.PathLike[str], seed: int = 0) -> None:
    """Save a tiny ``ZImagePipeline``: 128-wide transformer (4 heads x 32, 2 layers, 1 refiner layer each),
    ``AutoencoderKL`` with 4 latent channels, a 2-layer tied Qwen3 text encoder (hidden 64 = ``cap_feat_dim``)."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=128,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        qk_norm=True,
        cap_feat_dim=64,
        axes_dims=[8, 12, 12],
        axes_lens=[256, 64, 64],
    )
    _randomize_(transformer, seed + 1)
    pipe = ZImagePipeline(
        scheduler=_flow_scheduler(dynamic=False),
        vae=_kl_vae(seed + 2),
        text_encoder=_qwen3(num_hidden_layers=2, tie_word_embeddings=True, seed=seed + 3),
        tokenizer=build_qwen_tokenizer(),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(str(path))


def build_flux1(path: str | os.PathLike[str], seed: int = 0) -> None:
    """Save a tiny ``FluxPipeline``: 128-wide transformer (4 heads x 32, 1 double + 1 single block, guidance
    embeds), ``AutoencoderKL``, ``CLIPTextModel`` (hidden 64, 2 layers, 32 positions) and ``T5EncoderModel``
    (d_model 64, 2 layers, gated-gelu, tied ``shared``/``encoder.embed_tokens``)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = build_clip_tokenizer()
    t5_tok = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )
    _randomize_(transformer, seed + 1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            projection_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_SEQUENCE_LENGTH,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    _randomize_(clip, seed + 3)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=128,
            d_model=64,
            d_kv=32,
            d_ff=128,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    _randomize_(t5, seed + 4)
    pipe = FluxPipeline(
        scheduler=_flow_scheduler(dynamic=True),
        vae=_kl_vae(seed + 2),
        text_encoder=clip.eval(),
        tokenizer=clip_tok,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tok,
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(str(path))


def build_qwen3_causal_lm(path: str | os.PathLike[str], seed: int = 0) -> None:
    """Save a tiny untied ``Qwen3ForCausalLM`` (hidden 64, 2 layers, vocab 288) plus tokenizer to ``path``."""
    model = _qwen3(num_hidden_layers=2, tie_word_embeddings=False, seed=seed)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(path))
    build_qwen_tokenizer().save_pretrained(str(path))


BUILDERS = {
    "flux2_klein": build_flux2_klein,
    "zimage": build_zimage,
    "flux1": build_flux1,
    "qwen3": build_qwen3_causal_lm,
}


# --------------------------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_pipeline(pipe: Any, seed: int = 0, output_type: str = "latent", num_inference_steps: int = 2) -> torch.Tensor:
    """Run a tiny pipeline deterministically and return its output as a float32 CPU tensor.

    Uses :data:`PROMPT`, ``IMAGE_SIZE`` x ``IMAGE_SIZE`` pixels, ``max_sequence_length=MAX_SEQUENCE_LENGTH`` and a
    fixed CPU ``torch.Generator``.  ``output_type`` may be ``"latent"`` (default) or ``"pt"`` (decodes with the VAE).
    """
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "num_inference_steps": num_inference_steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": output_type,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
    }
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs)
    images = out.images if hasattr(out, "images") else out[0]
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(x) for x in images])
    return images.detach().float().cpu()


@torch.no_grad()
def run_causal_lm(model: Any, tokenizer: Any, max_new_tokens: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy-generate a few tokens; returns ``(logits of the prompt, generated ids)``."""
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    logits = model(input_ids=ids).logits.float()
    generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return logits, generated


def is_pipeline_dir(path: str | os.PathLike[str]) -> bool:
    """True for a diffusers pipeline folder (has ``model_index.json``)."""
    return (Path(path) / "model_index.json").is_file()


def load_dense(path: str | os.PathLike[str]) -> Any:
    """Load a tiny fixture without any quantization library (pipeline or ``(model, tokenizer)``)."""
    if is_pipeline_dir(path):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(str(path))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------------------------------------------------
# reference quantization (sdnq as black-box oracle)
# --------------------------------------------------------------------------------------------------------------------


def _import_reference() -> Any:
    os.environ["SDNQ_USE_TORCH_COMPILE"] = "0"
    import sdnq

    return sdnq


def _summarize(module: torch.nn.Module) -> dict[str, Any]:
    """Quantized/skipped counts and dtype map of a module quantized by the reference."""
    qc = getattr(module, "quantization_config", None)
    quantized = sorted(n for n, m in module.named_modules() if hasattr(m, "sdnq_dequantizer"))
    linears = sorted(n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear))
    dtypes: dict[str, int] = {}
    for m in module.modules():
        if hasattr(m, "sdnq_dequantizer"):
            wd = m.sdnq_dequantizer.weights_dtype
            dtypes[wd] = dtypes.get(wd, 0) + 1
    return {
        "quantized": len(quantized),
        "linear_total": len(linears),
        "skipped_linears": len(set(linears) - set(quantized)),
        "weights_dtypes": dtypes,
        "modules_dtype_dict": {k: sorted(v) for k, v in (getattr(qc, "modules_dtype_dict", None) or {}).items()},
    }


def quantize_with_reference(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    components: Sequence[str] = ("transformer", "text_encoder"),
    seed: int = 0,
    **sdnq_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Quantize a dense fixture with the reference ``sdnq_post_load_quant`` and save it with ``save_sdnq_model``.

    ``src_path`` is a pipeline folder (``components`` are quantized, saved with ``is_pipeline=True``) or a bare
    causal-LM folder (whole model quantized, tokenizer copied; ``components`` ignored).  ``sdnq_kwargs`` go to
    ``sdnq_post_load_quant``; ``minimum_allowed_numel`` defaults to :data:`MIN_NUMEL`.  The torch RNG is seeded per
    component so SVD (randomised low-rank) results are reproducible.  Imports ``sdnq`` into the current process.
    Returns a per-component summary (see ``_summarize``).
    """
    sdnq = _import_reference()
    kwargs = {"minimum_allowed_numel": MIN_NUMEL, **sdnq_kwargs}
    dst = Path(dst_path)
    summary: dict[str, dict[str, Any]] = {}
    if is_pipeline_dir(src_path):
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(src_path))
        for i, name in enumerate(components):
            torch.manual_seed(seed + i)
            module = getattr(pipe, name)
            sdnq.sdnq_post_load_quant(module, **kwargs)
            summary[name] = _summarize(module)
        sdnq.save_sdnq_model(pipe, str(dst), is_pipeline=True)
    else:
        model, tokenizer = load_dense(src_path)
        torch.manual_seed(seed)
        sdnq.sdnq_post_load_quant(model, **kwargs)
        summary["model"] = _summarize(model)
        sdnq.save_sdnq_model(model, str(dst))
        tokenizer.save_pretrained(str(dst))
    return summary


def load_with_reference(path: str | os.PathLike[str]) -> Any:
    """Load a reference-quantized fixture through the reference's diffusers/transformers registration."""
    _import_reference()
    return load_dense(path)


def _rel(folder: Path, root: Path) -> str:
    rel = folder.relative_to(root)
    return "" if rel == Path(".") else rel.as_posix()


def saved_quantization_configs(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``quantization_config`` from each ``config.json`` under ``path`` (keyed by sub-folder, ``""`` for root)."""
    out: dict[str, dict[str, Any]] = {}
    root = Path(path)
    for cfg in sorted(root.rglob("config.json")):
        data = json.loads(cfg.read_text())
        if "quantization_config" in data:
            out[_rel(cfg.parent, root)] = data["quantization_config"]
    return out


def inspect_safetensors(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Per folder: number of ``.scale`` keys, of uint8/int8 ``.weight`` tensors and the dtypes of all weights."""
    from safetensors import safe_open

    out: dict[str, dict[str, Any]] = {}
    root = Path(path)
    for file in sorted(root.rglob("*.safetensors")):
        key = _rel(file.parent, root)
        info = out.setdefault(key, {"scale_keys": 0, "packed_weights": 0, "weight_dtypes": {}})
        with safe_open(str(file), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                if k.endswith(".scale"):
                    info["scale_keys"] += 1
                if k.endswith(".weight"):
                    dt = str(f.get_slice(k).get_dtype())
                    info["weight_dtypes"][dt] = info["weight_dtypes"].get(dt, 0) + 1
                    if dt in ("U8", "I8"):
                        info["packed_weights"] += 1
    return out


# --------------------------------------------------------------------------------------------------------------------
# fixture cache
# --------------------------------------------------------------------------------------------------------------------


def fixture_path(name: str, variant: str, root: str | os.PathLike[str]) -> Path:
    """Where ``get_fixture`` stores ``name``/``variant`` under ``root``."""
    return Path(root) / f"v{FIXTURE_VERSION}" / name / variant


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run tiny-model work on one intra-op thread: on a busy 2-core box OpenMP spin-waiting made builds ~4x slower."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _build_into(target: Path, build: Any) -> None:
    """Build into a temporary sibling folder and rename it into place (so half-built folders are never reused)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    build(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _quantize_variant(dense: Path, name: str, variant: str, summary: dict[str, Any], dst: Path) -> None:
    summary.update(quantize_with_reference(dense, dst, COMPONENTS[name], **VARIANTS[variant]))
    (dst / "reference_summary.json").write_text(json.dumps(summary, indent=1))


def build_fixtures(
    root: str | os.PathLike[str],
    names: Iterable[str] = FIXTURE_NAMES,
    variants: Iterable[str] = ("dense", *VARIANTS),
    verbose: bool = False,
) -> dict[str, Any]:
    """Build (in this process) every missing ``name``/``variant`` under ``root``; returns timings and summaries."""
    report: dict[str, Any] = {}
    variants = list(variants)
    with _single_thread():
        for name in names:
            _build_name(Path(root), name, variants, report, verbose)
    return report


def _build_name(root: Path, name: str, variants: list[str], report: dict[str, Any], verbose: bool) -> None:
    """Build the dense folder and the missing ``variants`` of one fixture ``name`` under ``root``."""
    dense = fixture_path(name, "dense", root)
    if not dense.is_dir():
        t0 = time.perf_counter()
        _build_into(dense, BUILDERS[name])
        report[f"{name}/dense"] = {"seconds": round(time.perf_counter() - t0, 2)}
    for variant in variants:
        target = fixture_path(name, variant, root)
        if variant == "dense" or target.is_dir():
            continue
        t0 = time.perf_counter()
        summary: dict[str, Any] = {}
        _build_into(target, functools.partial(_quantize_variant, dense, name, variant, summary))
        report[f"{name}/{variant}"] = {"seconds": round(time.perf_counter() - t0, 2), "summary": summary}
    if verbose:
        for k, v in report.items():
            if k.startswith(name + "/"):
                counts = {
                    c: (d["quantized"], d["skipped_linears"], d["weights_dtypes"])
                    for c, d in v.get("summary", {}).items()
                }
                print(f"{k}: {v['seconds']}s (quantized, skipped linears, dtypes) {counts}", flush=True)


def get_fixture(
    name: str, variant: str, root: str | os.PathLike[str], isolate: bool = True, build_all: bool = True
) -> Path:
    """Return the folder of fixture ``name`` (``FIXTURE_NAMES``) in ``variant`` (``"dense"`` or ``VARIANTS``).

    Built once under ``root`` and reused afterwards.  ``"dense"`` is built in-process (no ``sdnq`` needed).  The
    first request for a quantized variant builds the dense folders and *all* variants at once -- of every fixture
    name when ``build_all`` (default, one child start-up instead of four), else only of ``name``.  With
    ``isolate=True`` (default) that runs in a child process so ``sdnq`` is never imported into the caller.  Each
    quantized folder gets a ``reference_summary.json`` with the reference's quantized/skipped counts.
    """
    if name not in BUILDERS:
        raise KeyError(f"unknown fixture {name!r}; expected one of {FIXTURE_NAMES}")
    if variant != "dense" and variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; expected 'dense' or one of {tuple(VARIANTS)}")
    target = fixture_path(name, variant, root)
    if target.is_dir():
        return target
    base = Path(root)
    with _lock(base):
        if target.is_dir():
            return target
        if variant == "dense":
            build_fixtures(base, [name], ["dense"])
            return target
        names = list(FIXTURE_NAMES) if build_all else [name]
        variants = ["dense", *VARIANTS]
        if isolate:
            env = {**os.environ, "SDNQ_USE_TORCH_COMPILE": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "DIFFUSERS_SDNQ_AUTOLOAD": "0"}  # the reference child must not get our start-up hook
            cmd = [sys.executable, str(Path(__file__).resolve()), str(base), *names, "--variants", *variants]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"building fixture {name}/{variant} failed:\n{proc.stdout}\n{proc.stderr}")
        else:
            build_fixtures(base, names, variants)
    return target


# --------------------------------------------------------------------------------------------------------------------
# verification / CLI
# --------------------------------------------------------------------------------------------------------------------


def verify_reference_fixture(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reload a quantized fixture with the reference, run it twice (must be identical) and inspect its files."""
    loaded = load_with_reference(path)
    if isinstance(loaded, tuple):
        a = run_causal_lm(*loaded)[0]
        b = run_causal_lm(*loaded)[0]
    else:
        a, b = run_pipeline(loaded), run_pipeline(loaded)
    if not torch.equal(a, b) or not torch.isfinite(a).all():
        raise AssertionError(f"non-deterministic or non-finite output from {path}")
    files = inspect_safetensors(path)
    for comp, info in files.items():
        if info["scale_keys"] and not info["packed_weights"]:
            raise AssertionError(f"{path}/{comp}: .scale keys without packed integer weights")
    return {"output_shape": tuple(a.shape), "files": files, "configs": saved_quantization_configs(path)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build fixtures under ROOT (optionally only NAMEs / --variants), optionally --verify them."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("names", nargs="*", default=list(FIXTURE_NAMES))
    parser.add_argument("--variants", nargs="+", default=["dense", *VARIANTS])
    parser.add_argument("--verify", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    build_fixtures(args.root, args.names, args.variants, verbose=True)
    print(f"build total {time.perf_counter() - t0:.1f}s", flush=True)
    if args.verify:
        for name in args.names:
            for variant in args.variants:
                path = fixture_path(name, variant, args.root)
                if variant == "dense":
                    loaded = load_dense(path)
                    out = run_causal_lm(*loaded)[0] if isinstance(loaded, tuple) else run_pipeline(loaded)
                    print(f"{name}/dense output {tuple(out.shape)}")
                    continue
                res = verify_reference_fixture(path)
                print(f"{name}/{variant}:", json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
