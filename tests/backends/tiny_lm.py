"""A tiny random causal LM (Llama architecture, 2 layers, width 32) built offline for tests.

Its vocabulary is printable ASCII letters and punctuation, one character per token, so any
sampled reply is speakable text (random letters, spaces and full stops that the fragmenter
can cut) and any prompt tokenizes (other characters become <|unk|>). The chat template is a
plain role-per-block layout; sampling is on by default, so temperature and seed matter.

``hidden_size`` is split over 2 heads: the default 32 gives heads of 16, the smallest model;
vLLM's CPU attention kernels need head sizes of 32 or more, so its tests pass 64.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
CONTEXT_GAIN = 20.0
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def build_tiny_lm(out: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    symbols = [byte_level.pre_tokenize_str(c)[0][0] for c in CHARS]
    vocab = {"<|unk|>": 0, **{sym: i + 1 for i, sym in enumerate(symbols)}}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|unk|>", bos_token=SPECIALS[0],
        eos_token=SPECIALS[1], pad_token=SPECIALS[2])
    hf_tok.chat_template = CHAT_TEMPLATE
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=1024, bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        # At the default init (std 0.02) two random layers give nearly flat logits: the reply
        # was the same whatever the history, so no test could see the prompt reach the model.
        # Weights x20 (std 0.4) make the reply depend on every token of the prompt.
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.mul_(CONTEXT_GAIN)
        # a zero row: EOS keeps a logit of 0 and is drawn now and then, so replies can end
        # before max_tokens
        model.lm_head.weight[hf_tok.eos_token_id] = 0.0
    # the other specials are not text: never drawn
    model.generation_config.suppress_tokens = [
        hf_tok.convert_tokens_to_ids(t) for t in ("<|unk|>", SPECIALS[0], SPECIALS[2])]
    model.generation_config.do_sample = True
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out
