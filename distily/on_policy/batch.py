"""Prompts + completions as one training batch: right-padded, the labels on the completion tokens only."""

from __future__ import annotations

import torch


def completion_batch(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (B, L) for rows ``prompt + completion``, right-padded to the
    longest row (so positions count from 0 in every row, as in the off-policy blocks).

    ``labels`` is the token at completion positions and -100 elsewhere (prompt, padding): the trainer predicts
    ``labels[:, 1:]`` from positions ``:-1``, so the loss covers exactly the completion tokens, the first one
    predicted from the prompt's last token. A row needs a non-empty prompt (something to predict from).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions.")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("Every prompt needs at least one token to predict the completion from.")
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.as_tensor([*prompt, *completion], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}
