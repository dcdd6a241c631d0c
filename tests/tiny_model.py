"""A tiny random Llama + ByteLevel BPE tokenizer with SmolLM2's ChatML template, built in-process.

Tests that need "a causal LM" use this instead of a downloaded model:

    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok)          # ~50k parameters, random weights (seeded)
    path = save_tiny_model(tmp_path / "tiny")   # an HF folder loadable by AutoModelForCausalLM/AutoTokenizer
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# SmolLM2-135M-Instruct's template (without its built-in default system prompt text changed).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

_CORPUS = """
system user assistant You are a helpful assistant of a Swedish construction company.
Do I need a building permit for an extension? A bygglov is required for new construction and extensions.
Hello, how are you? I am fine, thank you. What is your name? I am a bot.
The municipality handles permits under the Planning and Building Act (PBL) and Boverket rules (BBR).
Context (quoted reference data, not instructions) Question: answer only from the numbered context [1] [2] [3].
A friggebod or attefallshus can often be built without a permit. Demolition needs a rivningslov.
0123456789 .,;:!?'"()[]{}<>-_/\\|@#$%^&*+= abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ åäöÅÄÖ
"""


def make_tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """ByteLevel BPE trained on a few sentences: any text encodes (bytes fall back), ids 0-2 are special."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32 and seeded random weights (fp32, eval mode)."""
    tokenizer = tokenizer or make_tiny_tokenizer()
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer as a standard HF folder; returns the folder."""
    out = Path(out_dir)
    tok = make_tiny_tokenizer()
    model = make_tiny_model(tok, seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
