"""Layer-name patterns of an SDNQ config (issue 16 item 3, issue 15 item 4): the reference's meaning, matched in
bounded time, invalid ones refused naming the field, module names in modules_to_not_convert, unused ones warned.

Oracles: Python's ``re`` on the regex the format's rules build (docs/format-spec.md §5.3), on names short enough
for its backtracking; the reference itself (a child process quantizing a small model with each pattern and
reporting which layers it left dense: tests/hostile_reference.py); and operation counts instead of timings.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from hostile_reference import NAMES, PATTERNS, reference_patterns

from diffusers_sdnq.format import SDNQConfigError
from diffusers_sdnq.format.config import QuantConfig
from diffusers_sdnq.format.errors import SDNQUnusedPatternWarning


def _config(**fields) -> QuantConfig:
    return QuantConfig.from_dict({"weights_dtype": "int8", "sdnq_version": "0.2.8", **fields}, source="test.json")


def test_matching_is_the_reference_s() -> None:
    """The reference, as a black box, leaves dense exactly the layers our reading of each pattern names (the
    module-name convention aside, which the reference does not have: ``reference_only``)."""
    reference = reference_patterns()
    assert sorted(reference) == sorted(PATTERNS)
    for pattern in PATTERNS:
        config = _config(modules_to_not_convert=[pattern])
        ours = [n for n in NAMES if config.is_skipped(f"{n}.weight", reference_only=True)]
        assert ours == reference[pattern], pattern


def test_backtracking_patterns_run_in_linear_time() -> None:
    """``(.+)+X*`` took 0.83 s on a 24-character name and four times longer per two characters more. The matcher
    simulates an automaton: its work (automaton states visited) is counted, not timed, and grows linearly with
    the name."""
    from diffusers_sdnq.format import patterns as pat

    visits = {"n": 0}
    original = pat._NFAMatcher._closure

    def counting(self, states, pos, name):
        out = original(self, states, pos, name)
        visits["n"] += len(out)
        return out

    for pattern in ("(.+)+X*", "(a|aa)*b*", "(x+x+)+y*", "(.*a){12}*"):
        counts = []
        for length in (25, 50, 100):
            matcher = pat.compile_wildcard.__wrapped__(pattern)  # a fresh one: no cached transitions
            visits["n"] = 0
            pat._NFAMatcher._closure = counting
            try:  # Python's re on 12 characters (cheap even when it backtracks) gives the expected answer
                assert matcher.match("a" * length + ".weight") == bool(re.match(pat.reference_regex(pattern),
                                                                                  "a" * 12 + ".weight"))
            finally:
                pat._NFAMatcher._closure = original
            counts.append(visits["n"])
        assert counts[2] <= 5 * counts[0], (pattern, counts)  # 4x the name, ~4x the work (exponential: 2**75x)
    config = _config(modules_dtype_dict={"uint4": ["(.+)+X*"]}, modules_quant_config={"(x+x+)+y*": {}})
    assert config.options_for("a" * 2000 + ".weight", "linear").weights_dtype == "int8"  # would never return


def test_thousands_of_patterns_are_compiled_once() -> None:
    """20,000 wildcard patterns cost 1 s per layer (recompiled for each layer). They are compiled when the config
    is read; matching a layer compiles nothing."""
    patterns = [f"blocks.{i}.attn*" for i in range(20_000)]
    config = _config(modules_dtype_dict={"uint4": patterns}, modules_to_not_convert=[f"x{i}.*" for i in range(2000)])
    compiled = {"n": 0}
    original = re.compile

    def counting(*args, **kwargs):
        compiled["n"] += 1
        return original(*args, **kwargs)

    import diffusers_sdnq.format.patterns as pat

    pat.re.compile = counting
    try:
        for i in range(0, 20_000, 2000):
            assert config.options_for(f"blocks.{i}.attn.to_q.weight", "linear").weights_dtype == "uint4"
            assert not config.is_skipped(f"blocks.{i}.attn.to_q.weight")
        assert config.options_for("other.weight", "linear").weights_dtype == "int8"
    finally:
        pat.re.compile = original
    assert compiled["n"] == 0


@pytest.mark.parametrize("field", ["modules_to_not_convert", "modules_to_not_use_matmul", "modules_dtype_dict",
                                   "modules_quant_config"])
@pytest.mark.parametrize("pattern", ["mlp[*", "(a*", "(a)\\1*", "(?=a)b*", "a{5000}*"])
def test_invalid_patterns_are_errors_naming_the_field(field: str, pattern: str) -> None:
    """An invalid pattern (``mlp[*``) was silently ignored; a construct that cannot be matched in linear time
    (backreference, lookaround, huge repeat) is refused too."""
    value = {"modules_dtype_dict": {"int8": [pattern]}, "modules_quant_config": {pattern: {"group_size": 32}}}.get(
        field, [pattern])
    with pytest.raises(SDNQConfigError, match=rf"test\.json: {field}.*{re.escape(repr(pattern))}"):
        _config(**{field: value})


# ------------------------------------------------------------------------------------------------ issue 15 item 4


def _dense_lm():
    from hostile import fixture

    return fixture("qwen3", "dense")


def test_module_names_in_modules_to_not_convert_skip_the_layer(tmp_path) -> None:
    """transformers' convention: a full module name (or a parent, or a dotted suffix) leaves those layers dense;
    the saved config records each by its full ``.weight`` name, which is what the reference matches."""
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    qc = SDNQTransformersConfig(weights_dtype="int8", minimum_allowed_numel=0,
                                modules_to_not_convert=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SDNQUnusedPatternWarning)
        model = AutoModelForCausalLM.from_pretrained(_dense_lm(), quantization_config=qc,
                                                     dtype=torch.float32)
    dense = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    quantized = {n for n, m in model.named_modules() if hasattr(m, "sdnq_layout")}
    assert "model.layers.0.self_attn.q_proj" in dense and "model.layers.0.self_attn.k_proj" in quantized
    assert {n for n in dense if n.startswith("model.layers.1.mlp.")} == {
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    recorded = set(saved["modules_to_not_convert"])
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"} <= recorded
    reread = QuantConfig.from_dict(saved)
    assert all(reread.is_skipped(f"{n}.weight", reference_only=True) for n in dense if n.startswith("model.layers"))


@pytest.mark.parametrize("field", ["modules_to_not_convert", "modules_dtype_dict", "modules_quant_config",
                                   "modules_to_not_use_matmul"])
def test_patterns_matching_no_layer_warn(tmp_path, field: str) -> None:
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    typo = "model.layers.0.self_attn.q_prj"
    value = {"modules_dtype_dict": {"uint4": [typo]}, "modules_quant_config": {typo: {"group_size": 32}}}.get(
        field, [typo])
    qc = SDNQTransformersConfig(weights_dtype="int8", minimum_allowed_numel=0, **{field: value})
    with pytest.warns(SDNQUnusedPatternWarning, match=rf"{field}.*{re.escape(typo)}"):
        AutoModelForCausalLM.from_pretrained(_dense_lm(), quantization_config=qc, dtype=torch.float32)


def test_module_name_in_a_full_name_field_warns_with_a_hint(tmp_path) -> None:
    """modules_dtype_dict matches full parameter names (the reference's rule): a module name there matches
    nothing; the warning says which name was probably meant."""
    from transformers import AutoModelForCausalLM

    from diffusers_sdnq.integrations.transformers import SDNQTransformersConfig

    qc = SDNQTransformersConfig(weights_dtype="int8", minimum_allowed_numel=0,
                                modules_dtype_dict={"uint4": ["model.layers.0.self_attn.q_proj"]})
    with pytest.warns(SDNQUnusedPatternWarning, match=r"did you mean 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        AutoModelForCausalLM.from_pretrained(_dense_lm(), quantization_config=qc, dtype=torch.float32)
