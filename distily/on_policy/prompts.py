"""Where the prompts of sampled batches come from, one source per class behind :class:`PromptSource`.

* :class:`BlockPrompts` (``--prompt_len N``): the first N real tokens of each block of the training batch, for
  code and text corpora; the sampled batch keeps the batch's size and the data order.
* :class:`ChatPrompts` (``--prompts FILE``): chat prompts from a file or a ``distily synth`` folder, rendered with
  the tokenizer's chat template once, drawn in a seeded order that depends only on the draw's index (so a
  resumed run draws the same prompts).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..data.synth_format import is_synth_folder, plain_chat, read_samples, render_sample
from ..errors import DataError


class PromptSource(ABC):
    """Token-id prompts for one micro-batch."""

    @abstractmethod
    def prompts(self, inputs: dict[str, torch.Tensor], draw: int) -> list[list[int]]:
        """The prompts replacing batch ``inputs``; ``draw`` numbers the micro-batches of the run (0, 1, ...)."""


class BlockPrompts(PromptSource):
    """The first ``prompt_len`` real tokens of each block (a shorter block gives all its tokens but the last)."""

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len

    def prompts(self, inputs: dict[str, torch.Tensor], draw: int) -> list[list[int]]:
        input_ids = inputs["input_ids"].cpu()
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            lengths = [input_ids.shape[1]] * len(input_ids)
        else:
            lengths = attention_mask.sum(-1).cpu().tolist()
        # Right-padded blocks: the real tokens come first. Keep at least one token, and never the whole block.
        return [
            row[: max(1, min(self.prompt_len, int(length) - 1))].tolist()
            for row, length in zip(input_ids, lengths, strict=True)
        ]


class ChatPrompts(PromptSource):
    """A fixed list of prompts; draw ``d`` takes the next ``batch`` of a seeded permutation (a new one each pass)."""

    def __init__(self, prompts: list[list[int]], seed: int):
        if not prompts:
            raise DataError("The prompt source holds no prompts.")
        self._prompts = prompts
        self.seed = seed

    def __len__(self) -> int:
        return len(self._prompts)

    def prompts(self, inputs: dict[str, torch.Tensor], draw: int) -> list[list[int]]:
        batch = inputs["input_ids"].shape[0]
        return [self._prompts[self._index(draw * batch + row)] for row in range(batch)]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self._prompts))
        order = torch.randperm(len(self._prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(order[offset])


def read_prompt_requests(path: str | Path) -> list[dict]:
    """The requests of a prompts file: ``{"messages": [...]}`` (chat) or ``{"input": text}`` (plain continuation).

    ``.txt``: one user prompt per line. ``.jsonl``: rows with ``messages`` (a chat), ``prompt`` (a user prompt) or
    ``input`` (raw text to continue). A ``distily synth`` folder: its samples' requests, one per prompt id.
    """
    path = Path(path)
    if is_synth_folder(path):
        seen, requests = set(), []
        for row in read_samples(path):
            if row["prompt_id"] not in seen:
                seen.add(row["prompt_id"])
                requests.append({"messages": row.get("messages"), "input": row.get("input")})
        return requests
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [{"messages": [{"role": "user", "content": line}]} for line in text.splitlines() if line.strip()]
    requests = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not JSON ({err.msg}).") from None
        if isinstance(row.get("messages"), list):
            requests.append({"messages": row["messages"]})
        elif isinstance(row.get("prompt"), str):
            requests.append({"messages": [{"role": "user", "content": row["prompt"]}]})
        elif isinstance(row.get("input"), str):
            requests.append({"input": row["input"]})
        else:
            raise DataError(f"{path}:{number} has none of 'messages', 'prompt' or 'input'.")
    return requests


def render_prompt(tokenizer, request: dict) -> list[int]:
    """A request as token ids: the chat template up to the assistant's turn, or the plain text."""
    if request.get("messages") is None:
        text = request.get("input") or ""
    elif getattr(tokenizer, "chat_template", None):
        text, _ = render_sample(tokenizer, request, "")
    else:
        text = plain_chat(request["messages"])
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt_source(args, tokenizer) -> PromptSource:
    """``args.prompt_len`` > 0: :class:`BlockPrompts`; else ``args.prompts`` rendered by ``tokenizer``."""
    if args.prompt_len > 0:
        return BlockPrompts(args.prompt_len)
    if tokenizer is None:
        raise DataError("--prompts needs the tokenizer (processing_class=) to render the chat prompts.")
    limit = max(1, args.seq_len - args.max_new_tokens)  # the sampled row must fit the models' positions
    prompts = [ids[-limit:] for ids in (render_prompt(tokenizer, r) for r in read_prompt_requests(args.prompts)) if ids]
    return ChatPrompts(prompts, seed=args.seed)
