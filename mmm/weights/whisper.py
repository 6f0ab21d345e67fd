"""Whisper in CTranslate2 form (a ``WhisperSpec`` model.bin) -> a Hugging Face Whisper folder.

The folder is what ``WhisperForConditionalGeneration.from_pretrained`` reads: the weights, the
feature extractor (80 mels, 30 s = 3000 frames), the tokenizer and a generation config with
Whisper's language and task tokens, so the full model transcribes (the test checks it on a real
recording). MMM itself uses only the encoder.

Name mapping (CTranslate2 -> transformers), per layer: self-attention ``linear_0`` is q, k, v
stacked on the output axis (CTranslate2 stores a zero k bias, which Whisper does not have; it is
checked to be zero and dropped), ``linear_1`` is out_proj; cross-attention ``linear_0`` is q,
``linear_1`` k and v stacked, ``linear_2`` out_proj; ``gamma``/``beta`` are LayerNorm weight/bias;
``ffn/linear_0|1`` are fc1/fc2; ``position_encodings`` are the position embeddings. The output
projection is an alias of the decoder's token embeddings (tied, as in Whisper).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .ct2 import CT2Model

# Scalars of the spec that describe the architecture, not weights; checked against Whisper's.
_SPEC_FLAGS = {
    "decoder/activation", "decoder/alibi", "decoder/alibi_use_positive_positions", "decoder/alignment_heads",
    "decoder/alignment_layer", "decoder/pre_norm", "decoder/scale_alibi", "decoder/scale_embeddings",
    "decoder/start_from_zero_embedding", "decoder/num_heads", "encoder/num_heads",
}


_GELU = 3  # CTranslate2's ActivationType order: ReLU, GELUTanh, Swish, GELU, GELUSigmoid, Tanh


class WhisperMappingError(ValueError):
    """The CTranslate2 variables do not map one to one onto Whisper's parameters."""


def _layers(model: CT2Model, side: str) -> int:
    return len({m.group(1) for k in model.variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def _norm(out: dict, src: dict, ct2: str, hf: str) -> None:
    out[f"{hf}.weight"], out[f"{hf}.bias"] = src.pop(f"{ct2}/gamma"), src.pop(f"{ct2}/beta")


def _linear(out: dict, src: dict, ct2: str, hf: str) -> None:
    out[f"{hf}.weight"], out[f"{hf}.bias"] = src.pop(f"{ct2}/weight"), src.pop(f"{ct2}/bias")


def _split(out: dict, src: dict, ct2: str, hf: str, names: tuple[str, ...]) -> None:
    """A fused projection -> one linear per name; the k projection has no bias in Whisper."""
    weights = np.split(src.pop(f"{ct2}/weight"), len(names), axis=0)
    biases = np.split(src.pop(f"{ct2}/bias"), len(names), axis=0)
    for name, w, b in zip(names, weights, biases):
        out[f"{hf}.{name}.weight"] = w
        if name == "k_proj":
            if np.any(b != 0):
                raise WhisperMappingError(f"{ct2}: the key bias is not zero, but Whisper's k_proj has no bias")
        else:
            out[f"{hf}.{name}.bias"] = b


def _block(out: dict, src: dict, ct2: str, hf: str, cross: bool) -> None:
    _norm(out, src, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
    _split(out, src, f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
    _linear(out, src, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
    if cross:
        _norm(out, src, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        _linear(out, src, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        _split(out, src, f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
        _linear(out, src, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
    _norm(out, src, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
    _linear(out, src, f"{ct2}/ffn/linear_0", f"{hf}.fc1")
    _linear(out, src, f"{ct2}/ffn/linear_1", f"{hf}.fc2")


def state_dict(model: CT2Model) -> dict[str, np.ndarray]:
    """Every CTranslate2 weight under its ``WhisperForConditionalGeneration`` name, as float32.

    Raises if a weight is left over, so nothing is silently dropped."""
    if model.spec != "WhisperSpec":
        raise WhisperMappingError(f"expected a WhisperSpec model, got {model.spec!r}")
    src = {k: v for k, v in model.variables.items() if k not in _SPEC_FLAGS}
    out: dict[str, np.ndarray] = {}
    enc, dec = "model.encoder", "model.decoder"
    _linear(out, src, "encoder/conv1", f"{enc}.conv1")
    _linear(out, src, "encoder/conv2", f"{enc}.conv2")
    out[f"{enc}.embed_positions.weight"] = src.pop("encoder/position_encodings/encodings")
    for i in range(_layers(model, "encoder")):
        _block(out, src, f"encoder/layer_{i}", f"{enc}.layers.{i}", cross=False)
    _norm(out, src, "encoder/layer_norm", f"{enc}.layer_norm")
    out[f"{dec}.embed_tokens.weight"] = src.pop("decoder/embeddings/weight")
    out[f"{dec}.embed_positions.weight"] = src.pop("decoder/position_encodings/encodings")
    for i in range(_layers(model, "decoder")):
        _block(out, src, f"decoder/layer_{i}", f"{dec}.layers.{i}", cross=True)
    _norm(out, src, "decoder/layer_norm", f"{dec}.layer_norm")
    if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise WhisperMappingError(f"expected the output projection tied to the embeddings, aliases: {model.aliases}")
    out["proj_out.weight"] = out[f"{dec}.embed_tokens.weight"]
    if src:
        raise WhisperMappingError(f"CTranslate2 variables with no Whisper parameter: {sorted(src)[:8]}")
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def config(model: CT2Model, vocab_size: int):
    """The ``WhisperConfig`` these weights fit, read from the weight shapes and the spec's scalars."""
    from transformers import WhisperConfig

    v = model.variables
    if int(v["decoder/pre_norm"]) != 1 or int(v["decoder/activation"]) != _GELU:
        raise WhisperMappingError("expected pre-norm blocks with GELU, as Whisper has")
    d_model = v["encoder/conv1/weight"].shape[0]
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=v["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layers(model, "encoder"),
        decoder_layers=_layers(model, "decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )


def generation_config(tokenizer, package_config: dict, model_config):
    """Whisper's generation settings: language/task tokens, suppressed tokens, alignment heads."""
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    langs = {tokenizer.convert_ids_to_tokens(i): i for i in package_config["lang_ids"]}
    return GenerationConfig(
        decoder_start_token_id=model_config.decoder_start_token_id,
        bos_token_id=model_config.bos_token_id, eos_token_id=model_config.eos_token_id,
        pad_token_id=model_config.pad_token_id,
        max_length=model_config.max_target_positions,
        begin_suppress_tokens=list(package_config["suppress_ids_begin"]),
        suppress_tokens=list(package_config["suppress_ids"]),
        alignment_heads=[list(h) for h in package_config["alignment_heads"]],
        is_multilingual=len(langs) > 1,
        lang_to_id=langs,
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
    )


def convert(model: CT2Model, data_dir: Path, out: Path) -> dict:
    """Write the Hugging Face folder; returns what the record says (parameter counts)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    package_config = json.loads((data_dir / "config.json").read_text())
    tokenizer = WhisperTokenizer(tokenizer_file=str(data_dir / "tokenizer.json"), pad_token="<|endoftext|>")
    cfg = config(model, len(tokenizer))
    weights = {k: torch.from_numpy(v) for k, v in state_dict(model).items()}
    hf = WhisperForConditionalGeneration(cfg)
    result = hf.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WhisperMappingError(f"missing keys {result.missing_keys[:8]}, unexpected keys {result.unexpected_keys[:8]}")
    hf.generation_config = generation_config(tokenizer, package_config, cfg)
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, chunk_length=30).save_pretrained(out)
    return {
        "params": sum(p.numel() for p in hf.parameters()),
        "encoder_params": sum(p.numel() for p in hf.get_encoder().parameters()),
    }
