"""The unit every prompt source yields: one problem with its prompt as chat messages and as plain text, and
(for math) its gold answer. `cadence.chat` turns the messages into token ids with the model's template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["math", "chat"]

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Problem:
    """A prompt to sample from; `reference` is the gold answer for `math`, None for `chat`."""

    prompt_id: str
    """Stable across loads: the trainer de-duplicates rollouts by (prompt_id, policy_version)."""
    kind: Kind
    text: str
    """The prompt as plain text (what a model sees without a chat template)."""
    reference: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    """The conversation so far; left out, a single user turn holding `text` (every loader's math problem,
    WildChat's first user turn). Always set after construction."""

    def __post_init__(self) -> None:
        if not self.messages:
            object.__setattr__(self, "messages", ({"role": "user", "content": self.text},))

    def chat(self) -> list[dict[str, str]]:
        """The prompt as a message list for `apply_chat_template` (`cadence.chat.prompt_token_ids`)."""
        return [dict(message) for message in self.messages or ()]


def math_prompt(problem: str) -> str:
    """A competition problem followed by the instruction to box the final answer."""
    return f"{problem.strip()}\n\n{MATH_INSTRUCTION}"
