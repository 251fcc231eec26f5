"""The on-disk format of a ``distily synth`` folder, and how it becomes training data.

A synth folder holds::

    synth_manifest.json      what produced it: teacher, sampling, template, counts, token usage, status
    synth_config.yaml        the resolved flags (reloads to the same run; no secrets, only the key's env var name)
    prompts.jsonl            the planned prompts, each with a stable id (written once, before any sample)
    samples-00000.jsonl ...  the teacher's samples, in immutable shards written atomically
    rejected-00000.jsonl ... samples dropped by dedup or for being empty (kept so reruns skip them)

Training on it (``--dataset FOLDER``): each sample is rendered with the *training* tokenizer's chat template
(the prompt as the user turn, the teacher's completion as the assistant turn; plain ``prompt + completion`` for
continuation samples), and the loss covers only the completion tokens unless ``--prompt_loss true``. Samples
are split into train and eval by the hash of their prompt id, so every sample of one prompt is on one side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from ..errors import DataError
from .hashing import PACKING_VERSION, is_eval_key, stable_hash, tokenizer_fingerprint
from .mapping import INT32_SEQUENCE, map_to_blocks

MANIFEST = "synth_manifest.json"
CONFIG = "synth_config.yaml"
PROMPTS = "prompts.jsonl"
SAMPLES_PREFIX = "samples-"
REJECTED_PREFIX = "rejected-"
# Column that marks rows as prompt/completion samples (rendered with the chat template, prompt masked).
REQUEST_COLUMN = "synth_request"
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "prompt_id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "completion": datasets.Value("string"),
        REQUEST_COLUMN: datasets.Value("string"),
        "text": datasets.Value("string"),
    }
)


def plain_chat(messages: list[dict[str, str]]) -> str:
    """A chat as plain text, for tokenizers without a chat template (it ends where the assistant's answer starts)."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    turns = [f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def is_synth_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def shard_files(folder: str | Path, prefix: str = SAMPLES_PREFIX) -> list[Path]:
    """Complete shards (``prefix`` + 5 digits + ``.jsonl``) in index order; temporary files never match."""
    found = [p for p in Path(folder).glob(f"{prefix}*.jsonl") if p.stem[len(prefix) :].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[len(prefix) :]))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_samples(folder: str | Path) -> list[dict]:
    """Every kept sample of a synth folder, in shard order."""
    return [row for path in shard_files(folder) for row in read_jsonl(path)]


def plain_text(row: dict) -> str:
    """A sample as plain text (no chat template): the request, then the completion."""
    if row.get("messages") is not None:
        return f"{plain_chat(row['messages'])} {row['completion']}"
    return f"{row.get('input') or ''}{row['completion']}"


def is_eval_prompt(prompt_id: str, eval_fraction: float) -> bool:
    return is_eval_key(prompt_id, eval_fraction)


def _rows(files: list[str], eval_fraction: float, want_eval: bool, fingerprint: str) -> Iterator[dict]:
    del fingerprint  # keys the datasets cache only
    for path in files:
        for row in read_jsonl(Path(path)):
            if is_eval_prompt(row["prompt_id"], eval_fraction) != want_eval:
                continue
            request = {"messages": row.get("messages"), "input": row.get("input")}
            yield {
                "id": row["id"],
                "prompt_id": row["prompt_id"],
                "prompt": row.get("prompt") or "",
                "completion": row["completion"],
                REQUEST_COLUMN: json.dumps(request, ensure_ascii=False),
                "text": plain_text(row),
            }


def load_synth_documents(
    folder: str | Path, eval_fraction: float, cache_dir: str | None = None, text_field: str = "text"
) -> DatasetDict:
    """A synth folder as ``train``/``eval`` splits (by prompt-id hash) with the columns of :data:`FEATURES`.

    With another ``text_field`` (e.g. ``completion``) the plain ``text`` column is dropped, so that field can
    become the text.
    """
    folder = Path(folder)
    files = shard_files(folder)
    if not files:
        raise DataError(
            f"Synthetic dataset {str(folder)!r} has no samples yet (no {SAMPLES_PREFIX}*.jsonl shard). Run "
            "`distily synth` into it first."
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    fingerprint = digest.hexdigest()[:16]
    splits = {}
    for split, want_eval in (("train", False), ("eval", True)):
        try:
            splits[split] = Dataset.from_generator(
                _rows,
                gen_kwargs={
                    "files": [str(p) for p in files],
                    "eval_fraction": eval_fraction,
                    "want_eval": want_eval,
                    "fingerprint": fingerprint,
                },
                features=FEATURES,
                cache_dir=cache_dir,
                split=datasets.Split.TRAIN,
            )
        except ValueError as err:  # datasets refuses a generator that yields no rows
            total = sum(len(read_jsonl(p)) for p in files)
            raise DataError(
                f"Synthetic dataset {str(folder)!r} has {total} sample(s) and none falls in its {split} split "
                f"(--eval_fraction {eval_fraction}, by prompt id). Generate more samples or change --eval_fraction."
            ) from err
    documents = DatasetDict(splits)
    if text_field != "text" and text_field in FEATURES:
        documents = documents.remove_columns("text")
    return documents


# ----------------------------------------------------------------------------------------------------------------
# Rendering and packing with the prompt masked


def render_sample(tokenizer, request: dict, completion: str) -> tuple[str, str]:
    """``(prompt_text, completion_text)`` whose concatenation is the training text of one sample.

    Chat samples use the tokenizer's chat template: the prompt part ends with the assistant header (what
    ``add_generation_prompt=True`` gives) and the completion part holds the answer and the end-of-turn marker.
    Tokenizers without a chat template, and templates whose full render does not start with the prompt render,
    fall back to the plain ``User: ... Assistant:`` format.
    """
    messages = request.get("messages")
    if messages is None:
        return request.get("input") or "", completion
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    return plain_chat(messages), " " + completion


def pack_prompt_completion(batch: dict, tokenizer, seq_len: int, separator: int | None, prompt_loss: bool) -> dict:
    """Render, tokenise and pack samples into ``seq_len`` blocks with ``labels`` (-100 on prompt tokens).

    Like :func:`distily.data._pack`: samples are joined by the separator (EOS, which is trained: the student
    learns to stop), the remainder of each batch is dropped, and so are blocks with nothing to learn (every
    next-token label masked).
    """
    ids_stream: list[int] = []
    label_stream: list[int] = []
    eos_text = tokenizer.eos_token or ""
    for request_json, completion in zip(batch[REQUEST_COLUMN], batch["completion"], strict=True):
        prompt, answer = render_sample(tokenizer, json.loads(request_json), completion)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids_stream += prompt_ids + answer_ids
        label_stream += (prompt_ids if prompt_loss else [-100] * len(prompt_ids)) + answer_ids
        ends_with_eos = bool(eos_text) and (prompt + answer).rstrip().endswith(eos_text)
        if separator is not None and not ends_with_eos:
            ids_stream.append(separator)
            label_stream.append(separator)
    usable = len(ids_stream) - len(ids_stream) % seq_len
    blocks = {"input_ids": [], "labels": []}
    for start in range(0, usable, seq_len):
        labels = label_stream[start : start + seq_len]
        if any(label != -100 for label in labels[1:]):
            blocks["input_ids"].append(ids_stream[start : start + seq_len])
            blocks["labels"].append(labels)
    return blocks


def pack_synth_dataset(
    documents: Dataset, tokenizer, seq_len: int, prompt_loss: bool, num_proc: int | None = None, desc: str = ""
) -> Dataset:
    """``documents`` from :func:`load_synth_documents` as blocks with ``input_ids`` and ``labels`` (int32)."""
    fingerprint = stable_hash(
        documents._fingerprint,
        tokenizer_fingerprint(tokenizer),
        getattr(tokenizer, "chat_template", None),
        seq_len,
        prompt_loss,
        PACKING_VERSION,
        "prompt_completion",
    )
    return map_to_blocks(
        documents, pack_prompt_completion, {"input_ids": INT32_SEQUENCE, "labels": INT32_SEQUENCE}, fingerprint,
        desc or "Packing synthetic samples", num_proc,
        tokenizer=tokenizer, seq_len=seq_len, separator=tokenizer.eos_token_id, prompt_loss=prompt_loss,
    )  # fmt: skip
