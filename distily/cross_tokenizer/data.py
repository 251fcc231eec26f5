"""Blocks tokenised by both tokenizers: the student's ``seq_len`` tokens, the teacher's tokens of the same text,
and the aligned positions of the two (:func:`distily.cross_tokenizer.alignment.align`).

Positions are compared in UTF-8 byte coordinates (:func:`byte_spans`). Documents are joined with each
tokenizer's EOS, as :mod:`distily.data.packing` does; each EOS is one virtual byte after its document, so the
two EOS tokens align. The student's stream is cut
into ``seq_len`` blocks; a block's teacher tokens are those lying wholly inside its bytes (a teacher token
that straddles the block's edge is left out, so the positions around it are not aligned), at most
``teacher_seq_len`` of them. The blocks are cached by ``datasets`` under a key of both tokenizers' fingerprints.
"""

from __future__ import annotations

import bisect
import itertools
import json

import torch
from datasets import Dataset

from ..config import DataArguments
from ..data import BlockCollator, PreparedData, load_documents, stable_hash, tokenizer_fingerprint
from ..data.mapping import INT8_SEQUENCE, INT32_SEQUENCE, map_to_blocks
from ..data.synth_format import REQUEST_COLUMN
from ..errors import DataError
from .alignment import align

PAIRED_PACKING_VERSION = 1
PAIRED_COLUMNS = ("teacher_input_ids", "aligned_student", "aligned_teacher", "aligned_exact")


def byte_spans(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Each document's token ids and their spans in UTF-8 *bytes* of the document.

    For a byte-level BPE tokenizer without a normaliser the spans are exact: a token spells its bytes one
    symbol per byte (an added token: its content's bytes), so the cumulative lengths give the spans, even for a
    token that ends inside a multi-byte character (character offsets cannot say where). Other tokenizers: their
    character offsets, converted to bytes.
    """
    encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    byte_level = _is_byte_level(tokenizer)
    added = {index: token.content for index, token in tokenizer.added_tokens_decoder.items()}
    all_ids, all_spans = [], []
    for ids, offsets, text in zip(encodings["input_ids"], encodings["offset_mapping"], texts, strict=True):
        spans = None
        if byte_level:
            lengths = [
                len(added[i].encode("utf-8")) if i in added else len(t)
                for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
            ]
            if sum(lengths) == len(text.encode("utf-8")):
                ends = list(itertools.accumulate(lengths))
                spans = list(zip([0, *ends[:-1]], ends, strict=True))
        if spans is None:
            prefix = [0, *itertools.accumulate(len(char.encode("utf-8")) for char in text)]
            spans = [(prefix[start], prefix[end]) for start, end in offsets]
        all_ids.append(ids)
        all_spans.append(spans)
    return all_ids, all_spans


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    definition = json.loads(backend.to_str())
    return (
        definition.get("model", {}).get("type") == "BPE"
        and definition.get("normalizer") is None
        and '"ByteLevel"' in json.dumps(definition.get("pre_tokenizer"))
    )


def _stream(tokenizer, texts: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """The documents' tokens joined by the tokenizer's EOS, with their byte spans in the joined text (each EOS
    is one virtual byte after its document, the same on both sides)."""
    separator = tokenizer.eos_token_id
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    cursor = 0
    for token_ids, token_spans, text in zip(*byte_spans(tokenizer, texts), texts, strict=True):
        ids.extend(token_ids)
        spans.extend((cursor + start, cursor + end) for start, end in token_spans)
        cursor += len(text.encode("utf-8")) + 1
        if separator is not None:
            ids.append(separator)
            spans.append((cursor - 1, cursor))
    return ids, spans


def _pack_paired(batch: dict, student_tokenizer, teacher_tokenizer, seq_len: int, teacher_seq_len: int) -> dict:
    """Both tokenisations of a batch of documents as aligned blocks (see the module docstring)."""
    texts = batch["text"]
    streams = {"student": _stream(student_tokenizer, texts), "teacher": _stream(teacher_tokenizer, texts)}
    student_ids, student_spans = streams["student"]
    teacher_ids, teacher_spans = streams["teacher"]
    teacher_starts = [start for start, _ in teacher_spans]
    teacher_ends = [end for _, end in teacher_spans]
    columns: dict[str, list] = {"input_ids": [], **{name: [] for name in PAIRED_COLUMNS}}
    for first in range(0, len(student_ids) - len(student_ids) % seq_len, seq_len):
        start = student_spans[first][0]
        end = student_spans[first + seq_len - 1][1]
        # The teacher's tokens wholly inside the block's characters (starts and ends are non-decreasing).
        lo = bisect.bisect_left(teacher_starts, start)
        hi = max(lo, min(bisect.bisect_right(teacher_ends, end), lo + teacher_seq_len))
        alignment = align(student_spans[first : first + seq_len], teacher_spans[lo:hi])
        columns["input_ids"].append(student_ids[first : first + seq_len])
        columns["teacher_input_ids"].append(teacher_ids[lo:hi])
        columns["aligned_student"].append(alignment.student)
        columns["aligned_teacher"].append(alignment.teacher)
        columns["aligned_exact"].append([int(flag) for flag in alignment.exact])
    return columns


def pack_paired_dataset(
    documents: Dataset,
    student_tokenizer,
    teacher_tokenizer,
    seq_len: int,
    teacher_seq_len: int | None = None,
    num_proc: int | None = None,
    desc: str = "Tokenising with both tokenizers and aligning",
) -> Dataset:
    """``documents`` (a ``text`` column) as aligned blocks: ``input_ids`` (the student's, ``seq_len``),
    ``teacher_input_ids``, and the aligned positions ``aligned_student``, ``aligned_teacher``, ``aligned_exact``."""
    teacher_seq_len = teacher_seq_len or 2 * seq_len
    fingerprint = stable_hash(
        documents._fingerprint,
        tokenizer_fingerprint(student_tokenizer),
        tokenizer_fingerprint(teacher_tokenizer),
        seq_len,
        teacher_seq_len,
        PAIRED_PACKING_VERSION,
    )
    columns = {
        "input_ids": INT32_SEQUENCE,
        "teacher_input_ids": INT32_SEQUENCE,
        "aligned_student": INT32_SEQUENCE,
        "aligned_teacher": INT32_SEQUENCE,
        "aligned_exact": INT8_SEQUENCE,
    }
    return map_to_blocks(
        documents, _pack_paired, columns, fingerprint, desc, num_proc,
        student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer, seq_len=seq_len,
        teacher_seq_len=teacher_seq_len,
    )  # fmt: skip


def prepare_paired_datasets(
    args: DataArguments, student_tokenizer, teacher_tokenizer, seq_len: int, seed: int = 42
) -> PreparedData:
    """:func:`distily.data.prepare_datasets` for a cross-tokenizer run: the same documents, splits and block
    selection, packed by :func:`pack_paired_dataset`."""
    documents = load_documents(args)
    if REQUEST_COLUMN in documents["train"].column_names:
        raise DataError(
            f"{args.dataset!r} holds prompt/completion samples; a cross-tokenizer run (--student_tokenizer, "
            "--cross_tokenizer_loss) trains on plain text. Use a text dataset."
        )
    packed = {}
    for split in ("train", "eval"):
        blocks = pack_paired_dataset(
            documents[split], student_tokenizer, teacher_tokenizer, seq_len,
            num_proc=args.preprocessing_num_workers, desc=f"Packing and aligning {split} blocks",
        )  # fmt: skip
        if len(blocks) == 0:
            raise DataError(
                f"The {split} split of {args.dataset!r} holds fewer than seq_len={seq_len} student tokens, so no "
                "block could be packed. Use more text or a smaller --seq_len."
            )
        packed[split] = blocks
    fingerprints = {split: blocks._fingerprint for split, blocks in packed.items()}
    train, evaluation = packed["train"], packed["eval"]
    if args.max_train_blocks is not None and len(train) > args.max_train_blocks:
        train = train.shuffle(seed=seed).select(range(args.max_train_blocks))
    if args.max_eval_blocks is not None and len(evaluation) > args.max_eval_blocks:
        evaluation = evaluation.shuffle(seed=0).select(range(args.max_eval_blocks))
    return PreparedData(train, evaluation, len(documents["train"]), len(documents["eval"]), fingerprints)


class PairedBlockCollator:
    """Batches aligned blocks: the student's side as :class:`distily.data.BlockCollator` does, plus
    ``teacher_input_ids`` / ``teacher_attention_mask`` (padded) and the aligned positions, padded with -1."""

    def __init__(self, pad_token_id: int, teacher_pad_token_id: int):
        self.student = BlockCollator(pad_token_id)
        self.teacher_pad_token_id = teacher_pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.student([{key: f[key] for key in ("input_ids", "labels") if key in f} for f in features])
        batch["teacher_input_ids"], batch["teacher_attention_mask"] = _pad(
            [f["teacher_input_ids"] for f in features], self.teacher_pad_token_id
        )
        for name in ("aligned_student", "aligned_teacher", "aligned_exact"):
            batch[name], _ = _pad([f[name] for f in features], -1)
        return batch


def _pad(rows: list, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(1, max(len(row) for row in rows))
    out = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return out, mask
