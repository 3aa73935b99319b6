"""`cadence.chat`, the one place a prompt becomes token ids: the chat template when the tokenizer has one,
plain text without one (the toy), and every task loader yielding messages."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from cadence.chat import prompt_token_ids
from cadence.errors import InvalidRequest
from cadence.models.tokenizer import build_tokenizer
from cadence.tasks import Problem, math_prompt
from cadence.tasks.sources import generic_problems, numina_problems, wildchat_problems
from cadence.tasks.toy import load_toy

MARKED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}=={{ m['content'] }},{% endfor %}{% if add_generation_prompt %}=={% endif %}"
)
"""A chat template over the toy vocabulary: each turn framed by `==` … `,`, the generation prompt `==`."""


def templated_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = MARKED_TEMPLATE
    return tokenizer


def test_messages_go_through_the_template_with_the_generation_prompt() -> None:
    tokenizer = templated_tokenizer()
    messages = [{"role": "user", "content": "What is 1+2?"}]
    ids = prompt_token_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == "<s>==What is 1+2?,=="
    assert ids != prompt_token_ids(tokenizer, "What is 1+2?")


def test_without_a_template_a_lone_user_turn_is_its_plain_text() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    problem = load_toy("test")[0]
    assert prompt_token_ids(tokenizer, problem.chat()) == list(tokenizer(problem.text).input_ids)
    turns = [*problem.chat(), {"role": "assistant", "content": "3"}, {"role": "user", "content": "4?"}]
    with pytest.raises(InvalidRequest, match="no chat template"):
        prompt_token_ids(tokenizer, turns)
    with pytest.raises(InvalidRequest, match="needs `text`"):
        prompt_token_ids(tokenizer, [])


def test_the_toy_template_gives_the_plain_text_ids() -> None:
    """The toy's identity template: messages and text reach the seed model as the same ids."""
    tokenizer = build_tokenizer()
    for problem in load_toy("test")[:20]:
        assert prompt_token_ids(tokenizer, problem.chat()) == list(tokenizer(problem.text).input_ids)


def test_every_loader_yields_a_user_turn_holding_the_prompt() -> None:
    numina = numina_problems([{"problem": "Find x if x+1=3.", "answer": "2", "source": "amc_aime"}])
    wildchat = wildchat_problems(
        [{"conversation": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}],
          "language": "English"}]
    )  # fmt: skip
    math500 = generic_problems([{"problem": "What is 2+2?", "answer": "4", "unique_id": "a"}], "math", "math500")
    for problem in (*numina, *wildchat, *math500, load_toy("train")[0]):
        assert problem.messages == ({"role": "user", "content": problem.text},)  # what the feeder sends
    assert numina[0].chat()[0]["content"] == math_prompt("Find x if x+1=3.")  # the boxing instruction included
    assert wildchat[0].chat()[0]["content"] == "Hi there"  # the first user turn only
    conversation = ({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"})
    assert Problem("c", "chat", "a", messages=conversation).chat() == list(conversation)
