"""Which layers a new SDNQ checkpoint leaves dense by default (``add_skip_keys=True``).

Checkpoints written by diffusers-sdnq must quantize exactly the layers the reference quantizer (sdnq 0.2.8) would,
so that both produce interchangeable files. The tables below were *measured*: a one-layer model of each class name
in diffusers 0.42 / transformers 5.24 was quantized by the reference and the patterns it saved in
``modules_to_not_convert`` were recorded (``tests/test_writer_skip.py`` re-measures them). The reference decides
by class name; every class not listed gets :data:`GENERIC_SKIP_KEYS` plus the model's own
``_skip_layerwise_casting_patterns``. Every model also keeps ``_keep_in_fp32_modules`` and the names in
``_tied_weights_keys`` dense.

Patterns follow the format's name matching (``format.config.name_matches``): a leading "." anchors at the root,
a bare word matches one dotted component, "*" is a wildcard.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import nn

GENERIC_SKIP_KEYS: tuple[str, ...] = (
    ".condition_embedder", ".context_embedder", ".emb_in", ".emb_out", ".final_layer", ".img_in", ".img_out",
    ".norm_out", ".proj_in", ".proj_out", ".t_embedder", ".time_embed", ".txt_in", ".txt_out", ".vid_in",
    ".vid_out", ".x_embedder", ".y_embedder", "lm_head", "multi_modal_projector", "patch_emb", "patch_embed",
    "patch_embedding", "time_text_embed", "wte",
)
"""Input/output projections and embedders of unknown architectures: small, and sensitive to quantization."""

MODEL_SKIP_KEYS: dict[str, tuple[str, ...]] = {
    "ChromaTransformer2DModel": (".proj_out", "context_embedder", "distilled_guidance_layer", "norm_out",
                                 "time_text_embed", "x_embedder"),
    "ChronoEditTransformer3DModel": ("condition_embedder", "norm_out", "patch_embedding", "proj_out",
                                     "scale_shift_table"),
    "CosmosTransformer3DModel": ("crossattn_proj", "norm_out", "patch_embed", "proj_out", "time_embed",
                                 "transformer_blocks.0.norm*"),
    "Emu3ForCausalLM": ("lm_head", "tokenizer", "vq_model"),
    "Flux2Transformer2DModel": (".proj_out", "context_embedder", "double_stream_modulation_img",
                                "double_stream_modulation_txt", "norm_out", "single_stream_modulation",
                                "time_guidance_embed", "x_embedder"),
    "FluxTransformer2DModel": (".proj_out", "context_embedder", "norm_out",
                               "single_transformer_blocks.0.norm.linear.weight", "time_embed", "time_text_embed",
                               "x_embedder"),
    "Gemma3nForCausalLM": ("correction_coefs", "embedding_projection", "lm_head", "prediction_coefs"),
    "Gemma3nForConditionalGeneration": ("correction_coefs", "embedding_projection", "lm_head", "prediction_coefs"),
    "Gemma4ForConditionalGeneration": ("embed_audio", "embed_tokens", "embed_vision", "lm_head", "output_proj",
                                       "patch_embedder", "subsample_conv_projection"),
    "GlmImageForConditionalGeneration": ("embed_tokens", "embeddings", "lm_head", "patch_embed", "vqmodel"),
    "GlmImageTransformer2DModel": ("glyph_projector", "image_projector", "norm_out", "prior_projector", "proj_out",
                                   "time_condition_embed", "transformer_blocks.0.norm1.linear.weight"),
    "Ideogram4Transformer2DModel": ("adaln_proj", "embed_image_indicator", "final_layer", "input_proj",
                                    "layers.0.adaln_modulation.weight", "llm_cond_norm", "llm_cond_proj",
                                    "t_embedding"),
    "LTX2VideoTransformer3DModel": ("audio_caption_projection", "audio_proj_in", "audio_proj_out",
                                    "audio_time_embed", "av_cross_attn_audio_scale_shift",
                                    "av_cross_attn_audio_v2a_gate", "av_cross_attn_video_a2v_gate",
                                    "av_cross_attn_video_scale_shift", "caption_projection", "proj_in", "proj_out",
                                    "time_embed"),
    "LongCatImageTransformer2DModel": (".proj_out", "context_embedder", "norm_out",
                                       "single_transformer_blocks.0.norm.linear.weight", "time_embed",
                                       "time_text_embed", "x_embedder"),
    "Lumina2Transformer2DModel": ("layers.0.norm1.linear.weight", "norm_out", "time_caption_embed", "x_embedder"),
    "QwenImageTransformer2DModel": ("img_in", "norm_out", "proj_out", "time_text_embed",
                                    "transformer_blocks.0.img_mod.1.weight", "txt_in"),
    "WanTransformer3DModel": ("condition_embedder", "norm_out", "patch_embedding", "proj_out", "scale_shift_table"),
    "ZImageTransformer2DModel": ("all_final_layer", "all_x_embedder", "cap_embedder",
                                 "layers.0.adaLN_modulation.0.weight", "siglip_embedder", "t_embedder"),
}
"""Per architecture (class name): the layers the reference keeps dense instead of the generic list."""


def _names(value: Any) -> Iterator[str]:
    """Strings of a list/tuple/set attribute; dict attributes (tied weights) give keys and values."""
    if not value:
        return
    if isinstance(value, Mapping):
        for key, target in value.items():
            yield str(key)
            if isinstance(target, str):
                yield target
        return
    if isinstance(value, str):
        yield value
        return
    for item in value:
        yield str(item)


def default_skip_keys(model: nn.Module) -> list[str]:
    """The patterns ``add_skip_keys`` adds for ``model``: architecture keys, keep-in-fp32 and tied weights."""
    keys = list(MODEL_SKIP_KEYS.get(type(model).__name__, ()))
    if not keys:
        keys = [*GENERIC_SKIP_KEYS, *_names(getattr(model, "_skip_layerwise_casting_patterns", None))]
    keys += _names(getattr(model, "_keep_in_fp32_modules", None))
    keys += _names(getattr(model, "_tied_weights_keys", None))
    return keys


def merge_keys(first: Iterable[str], *more: Iterable[str]) -> list[str]:
    """Concatenate pattern lists, keeping the first occurrence of each."""
    out: list[str] = []
    seen: set[str] = set()
    for group in (first, *more):
        for key in group:
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out
