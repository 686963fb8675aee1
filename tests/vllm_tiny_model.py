"""A tiny Llama that vLLM can run, made here in seconds: no download, no network.

``build_tiny_llama(directory)`` saves a seeded random-weight ``LlamaForCausalLM`` (2 layers, hidden
256, 4 heads, vocab 4096, float32; about 7 MB) and a byte-level BPE tokenizer trained on this
Python's own standard-library sources, with bos/eos/pad/unk specials and a chat template. The same
seed gives the same weights, so greedy outputs are a function of the prompt alone, which is what lets
two schedulers be compared token for token.
"""

from __future__ import annotations

import inspect
from pathlib import Path

VOCAB = 4096
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
BOS, EOS = 1, 2
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _training_text() -> list[str]:
    import argparse
    import collections
    import dataclasses
    import email.message
    import json.decoder
    import pathlib
    import shutil
    import subprocess
    import textwrap
    import typing

    modules = (argparse, collections, dataclasses, email.message, json.decoder, pathlib, shutil, subprocess,
               textwrap, typing, inspect)
    return [inspect.getsource(m) for m in modules]


def build_tiny_llama(directory: str | Path, seed: int = 0, max_position_embeddings: int = 2048) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=max_position_embeddings, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(directory)

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_training_text(), trainer)
    if tokenizer.get_vocab_size() != VOCAB:  # every id the model can sample must decode
        raise RuntimeError(f"the tokenizer learned {tokenizer.get_vocab_size()} tokens, not {VOCAB}: more text needed")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def build_tiny_lora(directory: str | Path, seed: int, rank: int = 8) -> Path:
    """A seeded random LoRA adapter (PEFT's format) for the tiny Llama: rank ``rank`` on every
    attention projection of both layers, large enough that it changes what the model generates."""
    import json

    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    hidden, layers, targets = 256, 2, ("q_proj", "k_proj", "v_proj", "o_proj")
    weights = {}
    for layer in range(layers):
        for target in targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            weights[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=generator) * 0.1
            weights[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=generator) * 0.1
    save_file(weights, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
        target_modules=list(targets), fan_in_fan_out=False, modules_to_save=None, base_model_name_or_path="tiny")))
    return directory
