"""The one place a prompt becomes token ids: the model's chat template when it has one, else plain text.

Every prompt source yields chat messages (`cadence.tasks.Problem.chat()`: a math problem is one user turn
holding the problem and the boxing instruction, a WildChat prompt its first user turn). Rollouts, the
feeder's length check and evaluation all tokenize through `prompt_token_ids`, and a rollout carries the ids
it was generated from, which the trainer scores as they are; nothing re-renders a prompt downstream.

- A tokenizer with a chat template: `apply_chat_template(messages, add_generation_prompt=True)`, as the
  model was instruction-tuned (an instruct model sampled from raw text answers like a base model).
- Without one (a base model): a single user turn is tokenized as its plain text, exactly what the model
  saw before messages existed; a conversation of several turns needs a template and is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cadence.errors import InvalidRequest

Messages = Sequence[dict[str, str]]
PromptInput = str | Messages
"""Plain text, or chat messages (`role`, `content`)."""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer ships a chat template (instruct models do, base models usually not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_token_ids(tokenizer: Any, prompt: PromptInput) -> list[int]:
    """The token ids the model is prompted with; `InvalidRequest` when the prompt cannot be rendered."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("a prompt needs `text` or at least one chat message")
        return list(tokenizer(prompt).input_ids)
    if not prompt:
        raise InvalidRequest("a prompt needs `text` or at least one chat message")
    if not has_chat_template(tokenizer):
        return list(tokenizer(_plain_text(prompt, tokenizer)).input_ids)
    from jinja2 import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(
            [dict(message) for message in prompt], add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        raise InvalidRequest(f"the chat template of {_name(tokenizer)} refused the messages: {error}") from error
    return list(encoded["input_ids"])


def _plain_text(messages: Messages, tokenizer: Any) -> str:
    """A lone user turn's content: what a model without a chat template is prompted with."""
    if len(messages) == 1 and messages[0].get("role") == "user" and messages[0].get("content"):
        return messages[0]["content"]
    raise InvalidRequest(
        f"model {_name(tokenizer)} has no chat template, so only a single user turn can be sent to it "
        f"(got {len(messages)} messages); send the prompt as text or use a model with a chat template"
    )


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "the model")
