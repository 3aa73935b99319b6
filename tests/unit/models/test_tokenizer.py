"""The toy character tokenizer: ids, round trip, unknown characters, chat template, save/load."""

from __future__ import annotations

from pathlib import Path

from cadence.models.tokenizer import BOS, CHARACTERS, EOS, build_tokenizer, vocabulary

PROMPT, ANSWER = "What is 12+34?", " \\boxed{46}"


def test_vocabulary_is_small_and_special_tokens_come_first() -> None:
    vocab = vocabulary()
    assert 27 <= len(vocab) <= 40
    assert [vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert all(ch in vocab for ch in PROMPT + ANSWER)
    assert len(build_tokenizer()) == len(vocab) == 4 + len(set(CHARACTERS))


def test_one_token_per_character_and_round_trip() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer(PROMPT + ANSWER).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == 1 + len(PROMPT + ANSWER)
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT + ANSWER
    assert tokenizer.convert_ids_to_tokens(ids[1:5]) == ["W", "h", "a", "t"]


def test_unknown_characters_become_unk() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("1é2", add_special_tokens=False).input_ids
    assert ids == [tokenizer.convert_tokens_to_ids("1"), tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("2")]


def test_chat_template_matches_plain_prompt() -> None:
    """A user turn renders to exactly the plain prompt's tokens, so both call styles agree."""
    tokenizer = build_tokenizer()
    chat = [{"role": "user", "content": PROMPT}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == BOS + PROMPT
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenizer(PROMPT).input_ids
    full = [*chat, {"role": "assistant", "content": ANSWER}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == BOS + PROMPT + ANSWER + EOS


def test_saved_tokenizer_loads_with_autotokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(PROMPT).input_ids == build_tokenizer()(PROMPT).input_ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == BOS + "x"
