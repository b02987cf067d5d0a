"""Random-weight models in the formats the heavy backends load, built offline.

Worker hosts, CI and the dev machines have no model hub, so the backends' real loading and
inference code is exercised on models made here: ``tiny`` ones for tests and CPU runs, and,
for ``benchmarks/gpu_check.py`` on a GPU, models with a real architecture's shapes, whose
speed is that architecture's speed even though their output is noise.

* ``build_llama``: a Llama with a one-token-per-character tokenizer and a chat template
  (Hugging Face format: vLLM, ``transformers serve``). Sizes ``tiny`` (width 64, 2 layers,
  two heads of 32, the narrowest vLLM's CPU kernels take) and ``1b`` (Llama 3.2 1B's shapes).
* ``build_whisper``: a Whisper converted to CTranslate2 with a ``tokenizer.json`` laid out as
  Whisper's (faster-whisper and whisperX). Sizes ``tiny`` (width 64, 1+1 layers) and ``turbo``
  (large-v3-turbo's shapes: width 1280, 32 encoder and 4 decoder layers, 128 mel bins).
* ``build_vits``: a coqui-tts VITS saved as its trainer does (``config.json`` + ``model.pth``),
  characters instead of phonemes (no espeak needed), optionally multi-speaker. Sizes ``tiny``
  (~1.3M weights) and ``full`` (coqui's VITS defaults, the size of its released VITS voices).

The vocabularies are the tokenizers' (about 70 tokens for the Llama, ~1.8k for Whisper), not
the real models' (128k, 51.9k): the output projection is cheaper than a real model's, so a
random ``1b`` or ``turbo`` is slightly faster per token than the real one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["LLAMA_CHARS", "build_llama", "build_vits", "build_whisper"]

LLAMA_SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
LLAMA_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-\n"
LLAMA_CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")
LLAMA_SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 2},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8},
}
# At the default init (std 0.02) two random layers give nearly flat logits: the reply was the
# same whatever the history, so no test could see the prompt reach the model. Weights x20
# (std 0.4) make the tiny model's reply depend on every token of the prompt.
TINY_CONTEXT_GAIN = 20.0

WHISPER_SIZES = {
    "tiny": {"d_model": 64, "encoder_layers": 1, "decoder_layers": 1,
             "encoder_attention_heads": 2, "decoder_attention_heads": 2,
             "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_mel_bins": 80},
    "turbo": {"d_model": 1280, "encoder_layers": 32, "decoder_layers": 4,
              "encoder_attention_heads": 20, "decoder_attention_heads": 20,
              "encoder_ffn_dim": 5120, "decoder_ffn_dim": 5120, "num_mel_bins": 128},
}

VITS_TINY = {
    "hidden_channels": 16, "hidden_channels_ffn_text_encoder": 32,
    "num_layers_text_encoder": 1, "num_layers_posterior_encoder": 1, "num_layers_flow": 1,
    "upsample_initial_channel_decoder": 16, "resblock_kernel_sizes_decoder": [3],
    "resblock_dilation_sizes_decoder": [[1, 3, 5]], "upsample_rates_decoder": [8, 8, 4],
    "upsample_kernel_sizes_decoder": [16, 16, 8],  # 8 * 8 * 4 = 256 = the hop length
    "speaker_embedding_channels": 8,
}


def _need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"building this model needs {', '.join(missing)}")


def _size(sizes: dict, size: str) -> dict:
    if size not in sizes:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(sizes)}")
    return sizes[size]


def build_llama(out: Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random Llama in ``out`` (Hugging Face format, tokenizer and chat template beside it).

    One token per character of ``LLAMA_CHARS``, so any sampled reply is speakable text the
    fragmenter can cut, and any prompt tokenizes (other characters become ``<|unk|>``)."""
    _need("torch", "transformers", "tokenizers")
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers

    shape = _size(LLAMA_SIZES, size)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    symbols = [byte_level.pre_tokenize_str(c)[0][0] for c in LLAMA_CHARS]
    vocab = {"<|unk|>": 0, **{sym: i + 1 for i, sym in enumerate(symbols)}}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(LLAMA_SPECIALS)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|unk|>", bos_token=LLAMA_SPECIALS[0],
        eos_token=LLAMA_SPECIALS[1], pad_token=LLAMA_SPECIALS[2])
    hf_tok.chat_template = LLAMA_CHAT_TEMPLATE
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tok), max_position_embeddings=4096,
        bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False,
        **shape)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        if size == "tiny":
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.mul_(TINY_CONTEXT_GAIN)
        # a zero row: EOS keeps a logit of 0, drawn now and then, so replies can end early
        model.lm_head.weight[hf_tok.eos_token_id] = 0.0
    if size != "tiny":
        model = model.to(torch.bfloat16)  # as real checkpoints ship: half the bytes to load
    # the other specials are not text (transformers honours this; vLLM may still draw them,
    # and they decode to nothing)
    model.generation_config.suppress_tokens = [
        hf_tok.convert_tokens_to_ids(t) for t in ("<|unk|>", LLAMA_SPECIALS[0], LLAMA_SPECIALS[2])]
    model.generation_config.do_sample = True
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def _byte_tokenizer(specials: list[str]):
    """A byte-level tokenizer with no merges: 256 byte tokens, then ``specials`` in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok, vocab


def build_whisper(out: Path, size: str = "tiny", quantization: str | None = None) -> Path:
    """A random Whisper in CTranslate2 format in ``out/whisper-ct2`` that faster-whisper and
    whisperX load offline; ``quantization`` as CTranslate2's converter takes it (None keeps
    float32; the loader's compute_type converts again at load).

    faster-whisper reads ``tokenizer.json`` from the model directory (else it downloads one),
    and finds its special tokens by name, so the vocabulary is laid out as Whisper's: text
    tokens, <|endoftext|>, <|startoftranscript|>, languages, tasks, ..., <|notimestamps|>, then
    the 1501 timestamp tokens 0.00..30.00 that must follow it."""
    _need("torch", "transformers", "ctranslate2", "tokenizers")
    import ctranslate2
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    shape = _size(WHISPER_SIZES, size)
    langs = ["en", "de", "fr"]
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{x}|>" for x in langs]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                   "<|nospeech|>", "<|notimestamps|>"]
                + [f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    torch.manual_seed(0)  # the same random model every run, so timings compare
    tok, vocab = _byte_tokenizer(specials)
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    cfg = WhisperConfig(vocab_size=len(vocab), max_source_positions=1500,
                        max_target_positions=448, decoder_start_token_id=sot,
                        eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
                        # the defaults name GPT-2 ids (220, 50256), outside this vocabulary:
                        # CTranslate2 then writes out of bounds
                        suppress_tokens=[], begin_suppress_tokens=[eot], **shape)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, suppress_tokens=[],
        begin_suppress_tokens=[eot], is_multilingual=True,
        lang_to_id={f"<|{x}|>": vocab[f"<|{x}|>"] for x in langs},
        no_timestamps_token_id=vocab["<|notimestamps|>"])
    hf = out / "whisper-hf"
    model.save_pretrained(hf)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            additional_special_tokens=specials[1:]).save_pretrained(hf)
    ct2 = out / "whisper-ct2"
    ctranslate2.converters.TransformersConverter(str(hf)).convert(
        str(ct2), quantization=quantization, force=True)
    (ct2 / "tokenizer.json").write_bytes((hf / "tokenizer.json").read_bytes())
    return ct2


def build_vits(out: Path, size: str = "tiny", sample_rate: int = 22050,
               speakers: tuple[str, ...] | list[str] = ()) -> Path:
    """A random coqui-tts VITS in ``out`` (config.json + model.pth); with ``speakers``, a
    multi-speaker model whose speaker names the API lists."""
    _need("torch", "TTS")
    import torch
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits, VitsArgs

    shape = {"tiny": VITS_TINY, "full": {}}
    args = VitsArgs(init_discriminator=False, use_speaker_embedding=bool(speakers),
                    **_size(shape, size))
    config = VitsConfig(model_args=args, use_phonemes=False, text_cleaner="english_cleaners",
                        use_speaker_embedding=bool(speakers), speakers=list(speakers))
    config.audio.sample_rate = sample_rate
    torch.manual_seed(0)
    model = Vits(config)
    out.mkdir(parents=True)
    torch.save({"model": model.state_dict()}, out / "model.pth")
    model.config.save_json(str(out / "config.json"))
    return out
