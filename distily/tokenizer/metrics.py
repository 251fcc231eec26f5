"""Measures that compare models with different tokenizers: bits per byte and tokens per byte.

Perplexities are per token, so they cannot be compared across tokenizers; the negative log-likelihood of the
same text, divided by its UTF-8 bytes, can. Documents are joined with the tokenizer's EOS (the same packing as
training); every token after the leading EOS is predicted exactly once, in windows of ``seq_len`` tokens, and
each EOS between documents counts as one byte.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def tokens_per_byte(tokenizer, texts: Sequence[str]) -> float:
    """Tokens per UTF-8 byte of ``texts`` (no special tokens): lower is a denser tokenizer."""
    tokens = sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return tokens / max(sum(len(text.encode("utf-8")) for text in texts), 1)


def _stream(tokenizer, texts: Sequence[str]) -> list[int]:
    separator = tokenizer.eos_token_id
    stream = [separator]
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(separator)
    return stream[:-1]  # the last document's EOS is not predicted (nor counted as a byte)


@torch.no_grad()
def bits_per_byte(
    model, tokenizer, texts: Sequence[str], seq_len: int = 256, batch_size: int = 8, progress: bool = True
) -> dict[str, float]:
    """``model``'s bits per byte on ``texts``: ``Σ NLL / (ln 2 · bytes)`` with ``bytes`` the texts' UTF-8 bytes
    plus one per EOS between them. Returns ``bits_per_byte``, ``nll_nats``, ``bytes`` and ``tokens`` (predicted)."""
    from tqdm.auto import tqdm

    stream = _stream(tokenizer, texts)
    windows = [stream[start : start + seq_len + 1] for start in range(0, len(stream) - 1, seq_len)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for first in tqdm(range(0, len(windows), batch_size), desc="bits per byte", disable=not progress):
            group = windows[first : first + batch_size]
            length = max(len(window) for window in group)
            ids = torch.zeros((len(group), length), dtype=torch.long)
            targets = torch.full((len(group), length - 1), -100, dtype=torch.long)
            mask = torch.zeros((len(group), length), dtype=torch.long)
            for row, window in enumerate(group):
                ids[row, : len(window)] = torch.tensor(window)
                targets[row, : len(window) - 1] = torch.tensor(window[1:])
                mask[row, : len(window)] = 1
            logits = model(input_ids=ids[:, :-1].to(device), attention_mask=mask[:, :-1].to(device)).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="sum")
            nll += float(loss)
            tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    num_bytes = sum(len(text.encode("utf-8")) for text in texts) + len(texts) - 1
    return {"bits_per_byte": nll / (math.log(2) * num_bytes), "nll_nats": nll, "bytes": num_bytes, "tokens": tokens}
