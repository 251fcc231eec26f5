"""What a model is given to complete a code task: the raw prompt, or the prompt inside a chat turn.

* ``raw``: HumanEval's own prompt (a signature and docstring), continued as plain text. What base models and
  the Codex paper use.
* ``chat``: for instruct models. The user turn asks for the function in one code block and quotes the prompt;
  the assistant turn, rendered by the model's own chat template, is pre-filled with an opening code fence and
  the prompt itself, so the model continues the function's body exactly as in ``raw`` (and the completion is
  scored the same way: prompt + completion + test). Generation also stops at the closing fence. This is how
  EvalPlus and bigcode-evaluation-harness prompt instruct models for HumanEval.

A backend renders the chat template its own way (transformers' ``apply_chat_template``, llama.cpp's template
from the GGUF file); both go through :func:`chat_messages` and :func:`chat_prompt`, so they see the same text.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config.eval import check_prompt_format
from ..errors import ConfigError
from .schema import Task

FENCE = "```"
CHAT_STOPS = ("\n" + FENCE, FENCE)

ChatRenderer = Callable[[list[dict]], str]  # messages -> the text up to the assistant's turn


def chat_messages(task: Task) -> list[dict]:
    """The user turn of ``task`` for an instruct model."""
    return [
        {
            "role": "user",
            "content": (
                f"Complete the following {task.language} function. Reply with the whole function in one code "
                f"block.\n{FENCE}{task.language}\n{task.prompt.strip()}\n{FENCE}"
            ),
        }
    ]


def chat_prompt(task: Task, render: ChatRenderer) -> str:
    """The rendered chat turn, then the assistant's pre-filled start: an opening fence and the task's prompt."""
    return f"{render(chat_messages(task))}{FENCE}{task.language}\n{task.prompt}"


def prompt_builder(name: str, render: ChatRenderer | None) -> Callable[[Task], str]:
    """``task -> text`` for the format ``name``; ``chat`` needs the model's chat template (``render``)."""
    check_prompt_format(name)
    if name == "raw":
        return lambda task: task.prompt
    if render is None:
        raise ConfigError(
            "--prompt_format chat needs the model's chat template, and this model has none. Pass --prompt_format "
            "raw (the plain HumanEval prompt)."
        )
    return lambda task: chat_prompt(task, render)


def extra_stops(name: str) -> tuple[str, ...]:
    """Stop sequences a format adds to the language's own: the closing code fence of a chat answer."""
    return CHAT_STOPS if name == "chat" else ()
