"""Build a tiny Qwen3 chat model and tokenizer on the spot (no download).

Used by the tests, the CPU smoke paths of the benchmarks and `--model tiny-random`.
The tokenizer is a byte-level BPE trained on a small built-in corpus, with a ChatML
chat template that (like Qwen3's) accepts `enable_thinking`.
"""
from __future__ import annotations

import os
from pathlib import Path

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = """
The quick brown fox jumps over the lazy dog. Please write a short email to my manager.
Use a formal tone. What is 27 times 4? Thanks, that was helpful! Too long, be concise.
Explain how photosynthesis works in simple terms. Give me three tips for better sleep.
No emojis please. Stop using bullet points. Answer directly without filler praise.
system user assistant hindsight context future message guide answer OK thanks great
MARK PLAIN alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi
=== HINDSIGHT CONTEXT === [The following is a future message from the user.]
Sure! Here is a recipe. I think you should try it. Hello, how are you today? 0123456789
"""


def build_tiny_tokenizer(extra_corpus: list[str] | None = None, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    from sdpo_objective import DEFAULT_HINDSIGHT_TEMPLATE

    # The hindsight block is in the corpus (several times, so BPE merges it): keeps contexts short.
    corpus = _CORPUS.strip().splitlines() + [DEFAULT_HINDSIGHT_TEMPLATE] * 20 + list(extra_corpus or [])
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **overrides):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **overrides,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(out_dir: str | os.PathLike, seed: int = 0, **model_kwargs) -> str:
    """Write a tiny model + tokenizer folder loadable with from_pretrained; returns its path."""
    from auxiliary.runtime.library_notices import hide_deepspeed_cpu_notice

    hide_deepspeed_cpu_notice()  # save_pretrained imports DeepSpeed when it is installed
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
