"""The toy character-level tokenizer: one token per character, saved as a real `tokenizer.json`.

It is a `transformers.PreTrainedTokenizerFast` built from a `tokenizers` BPE model with no merges, so
`AutoTokenizer`, vLLM and the HF engine all load it from the model directory like any other tokenizer.

The chat template renders a user turn as its bare text and an assistant turn as its text plus EOS.
That is deliberate: `apply_chat_template([user], add_generation_prompt=True)` yields exactly the same
tokens as tokenizing the raw prompt (BOS is added either way), so the seed model answers the same
whether a caller sends plain text or a message list.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Digits, the operators and markup of `What is a+b?` → ` \boxed{a+b}`, the letters of "What is" and
# "boxed", and a little punctuation so malformed or rambling answers remain representable.
CHARACTERS = "0123456789 +-*=?.,{}\\Whatisboxed"
MAX_LENGTH = 64
"""Longest sequence the tiny models take: a toy prompt (≤ 15 tokens) plus 14 new tokens fits easily."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


def vocabulary() -> dict[str, int]:
    """Token → id: the special tokens first (pad = 0, bos = 1, eos = 2, unk = 3), then the characters."""
    tokens = list(SPECIAL_TOKENS) + list(dict.fromkeys(CHARACTERS))
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character tokenizer; characters outside the vocabulary become `<unk>`."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=True))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
