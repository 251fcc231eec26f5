"""Corpora, deterministic train/eval splits, tokenisation and packing into fixed-length blocks.

Tokenised blocks are cached by ``datasets``: the fingerprint of each step is derived from its inputs (the
source documents, the tokenizer's full definition, ``seq_len``), so a second run with the same inputs reads
the cached Arrow file instead of tokenising again or writing a second copy.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError

from .config import DataArguments
from .errors import DataError
from .teacher.synth_dataset import REQUEST_COLUMN, is_synth_folder, load_synth_documents, pack_synth_dataset

logger = logging.getLogger(__name__)

PYTHON_STDLIB = "python-stdlib"
# Bumped whenever the packing below changes, so stale caches are never reused.
PACKING_VERSION = 1
EVAL_SPLIT_NAMES = ("validation", "eval", "test")
# Values of the block_split column (prepare_datasets(block_index=True)).
BLOCK_SPLITS = {"train": 0, "eval": 1}
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
# Folders never read as corpus: installed third-party packages, caches and VCS metadata.
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules", ".venv"}


def stable_hash(*parts: object) -> str:
    """A hex digest of ``parts`` that is the same in every process and Python version."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:16]


def is_eval_key(key: str, eval_fraction: float) -> bool:
    """Deterministic hold-out: a document is in the eval split iff the hash of its key falls below the fraction."""
    bucket = int(hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < eval_fraction


# ----------------------------------------------------------------------------------------------------------------
# Reading documents


def python_stdlib_root() -> Path:
    """The standard library of the running interpreter (outside any virtual environment)."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_text_files(root: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """Files under ``root`` in a stable order, skipping hidden folders and installed packages."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            path = Path(directory) / name
            if path.is_file():
                files.append(path)
    return files


def _read_documents(root: str, relative_paths: list[str], fingerprint: str) -> Iterator[dict]:
    """Generator for ``Dataset.from_generator``; ``fingerprint`` only keys the cache (sizes and mtimes)."""
    del fingerprint
    for relative in relative_paths:
        raw = (Path(root) / relative).read_bytes()
        if b"\x00" in raw[:8192]:
            continue  # binary file
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield {"text": text, "path": relative}


def files_dataset(root: Path, eval_fraction: float, cache_dir: str | None, suffixes=None) -> DatasetDict:
    """A folder of text or code files as a ``DatasetDict`` (``train``/``eval``, split by path hash)."""
    if not root.is_dir():
        raise DataError(f"Dataset folder {str(root)!r} does not exist. Check the path given to --dataset.")
    files = list_text_files(root, suffixes)
    if not files:
        kind = f"{'/'.join(suffixes)} files" if suffixes else "files"
        raise DataError(f"Dataset folder {str(root)!r} contains no {kind}. Point --dataset at a folder with text.")
    relative = [str(path.relative_to(root)) for path in files]
    stats = [(rel, path.stat().st_size, path.stat().st_mtime_ns) for rel, path in zip(relative, files, strict=False)]
    splits = {"train": [], "eval": []}
    for rel in relative:
        splits["eval" if is_eval_key(rel, eval_fraction) else "train"].append(rel)
    if not splits["train"] or not splits["eval"]:
        raise DataError(
            f"Dataset folder {str(root)!r} has {len(relative)} file(s): too few to hold out an eval split with "
            f"--eval_fraction {eval_fraction}. Add files or raise --eval_fraction."
        )
    fingerprint = stable_hash(str(root), stats)
    features = datasets.Features({"text": datasets.Value("string"), "path": datasets.Value("string")})
    documents = {}
    for split, paths in splits.items():
        try:
            documents[split] = Dataset.from_generator(
                _read_documents,
                gen_kwargs={"root": str(root), "relative_paths": paths, "fingerprint": fingerprint},
                features=features,
                cache_dir=cache_dir,
                split=datasets.Split.TRAIN,
            )
        except ValueError as err:  # datasets refuses a generator that yields no rows
            raise DataError(
                f"Dataset folder {str(root)!r}: none of the {len(paths)} {split} file(s) holds text (they are "
                f"empty, blank, binary or not UTF-8). Point --dataset at a folder of text files. ({err})"
            ) from err
    return DatasetDict(documents)


def _data_files(spec: str) -> list[str] | None:
    """Data files named by ``spec`` (comma-separated paths or globs), or None if it names none."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts or not all(Path(part).suffix in DATA_FILE_BUILDERS for part in parts):
        return None
    files = []
    for part in parts:
        matches = sorted(glob.glob(os.path.expanduser(part)))
        if not matches:
            raise DataError(f"Data file {part!r} does not exist. Check the path given to --dataset.")
        files.extend(matches)
    return files


def load_documents(args: DataArguments) -> DatasetDict:
    """Documents as a ``DatasetDict`` with ``train`` and ``eval`` splits holding ``args.dataset_text_field``."""
    spec = args.dataset
    if spec == PYTHON_STDLIB:
        raw = files_dataset(python_stdlib_root(), args.eval_fraction, args.dataset_cache_dir, suffixes=(".py",))
        text_field = "text"
    else:
        text_field = args.dataset_text_field
        path = Path(spec).expanduser()
        files = _data_files(spec)
        if files is not None:
            builder = DATA_FILE_BUILDERS[Path(files[0]).suffix]
            if any(DATA_FILE_BUILDERS[Path(f).suffix] != builder for f in files):
                raise DataError(f"--dataset mixes file types ({spec}); pass files of one type.")
            # Several .txt files: one document each. A single .txt file: its blank-line separated paragraphs,
            # so that a train/eval hold-out is possible.
            extra = {"sample_by": "document" if len(files) > 1 else "paragraph"} if builder == "text" else {}
            try:
                raw = datasets.load_dataset(builder, data_files=files, cache_dir=args.dataset_cache_dir, **extra)
            except (StopIteration, ValueError, DatasetGenerationError) as err:  # data files with no rows
                raise DataError(
                    f"Dataset {spec!r} is empty: no rows could be read from {len(files)} {builder} file(s). "
                    f"Point --dataset at files that hold text. ({type(err).__name__}: {err})"
                ) from err
        elif is_synth_folder(path):  # `distily synth` output: prompt/completion samples, split by prompt id
            raw = load_synth_documents(path, args.eval_fraction, args.dataset_cache_dir, args.dataset_text_field)
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            try:
                raw = datasets.load_from_disk(str(path))
            except (IndexError, ValueError) as err:  # what datasets raises for an empty saved dataset
                raise DataError(f"Dataset folder {spec!r} could not be read as a saved dataset: {err!r}.") from err
        elif path.is_dir():
            raw = files_dataset(path, args.eval_fraction, args.dataset_cache_dir)
            text_field = "text"
        elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise DataError(
                f"Dataset path {spec!r} does not exist. Pass an existing folder or data file to --dataset, a Hub "
                f"dataset name, or {PYTHON_STDLIB!r}."
            )
        else:
            raw = datasets.load_dataset(spec, args.dataset_config_name, cache_dir=args.dataset_cache_dir)
    if isinstance(raw, Dataset):
        raw = DatasetDict({args.dataset_train_split: raw})
    return _train_eval_splits(raw, args, text_field)


def _train_eval_splits(raw: DatasetDict, args: DataArguments, text_field: str) -> DatasetDict:
    if args.dataset_train_split not in raw:
        raise DataError(
            f"Dataset {args.dataset!r} has no split {args.dataset_train_split!r}; it has {sorted(raw)}. "
            "Pass --dataset_train_split."
        )
    train = raw[args.dataset_train_split]
    if text_field not in train.column_names:
        raise DataError(
            f"Dataset {args.dataset!r} has no text column {text_field!r}; its columns are {train.column_names}. "
            "Pass --dataset_text_field with the column that holds the text."
        )
    train = _drop_blank(train, text_field)
    if len(train) == 0:
        raise DataError(
            f"Dataset {args.dataset!r} is empty (split {args.dataset_train_split!r} has no rows with text in "
            f"{text_field!r})."
        )
    if args.dataset_eval_split is not None:
        if args.dataset_eval_split not in raw:
            raise DataError(
                f"Dataset {args.dataset!r} has no split {args.dataset_eval_split!r}; it has {sorted(raw)}. "
                "Pass --dataset_eval_split with one of those, or leave it unset to hold out --eval_fraction."
            )
        evaluation = _drop_blank(raw[args.dataset_eval_split], text_field)
    else:
        named = [name for name in EVAL_SPLIT_NAMES if name in raw and name != args.dataset_train_split]
        if named:
            evaluation = _drop_blank(raw[named[0]], text_field)
        else:
            held_out = {"text_field": text_field, "fraction": args.eval_fraction}
            evaluation = train.filter(_in_eval, batched=True, fn_kwargs={**held_out, "want": True})
            train = train.filter(_in_eval, batched=True, fn_kwargs={**held_out, "want": False})
            if len(evaluation) == 0 or len(train) == 0:
                raise DataError(
                    f"Dataset {args.dataset!r} has {len(train) + len(evaluation)} document(s): too few to hold "
                    f"out an eval split with --eval_fraction {args.eval_fraction}. Add documents, raise "
                    "--eval_fraction or pass --dataset_eval_split."
                )
    if text_field != "text":
        train = train.rename_column(text_field, "text")
        evaluation = evaluation.rename_column(text_field, "text")
    return DatasetDict({"train": train, "eval": evaluation})


def _drop_blank(documents: Dataset, text_field: str) -> Dataset:
    """Rows whose text is missing or only whitespace are not documents."""
    if text_field not in documents.column_names:
        return documents
    return documents.filter(_has_text, batched=True, fn_kwargs={"text_field": text_field}, desc="Dropping blank rows")


def _has_text(batch: dict, text_field: str) -> list[bool]:
    return [bool(text and text.strip()) for text in batch[text_field]]


def _in_eval(batch: dict, text_field: str, fraction: float, want: bool) -> list[bool]:
    return [is_eval_key(text or "", fraction) == want for text in batch[text_field]]


# ----------------------------------------------------------------------------------------------------------------
# Tokenising and packing


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes token ids.

    Fast tokenizers serialise their whole pipeline (``backend_tokenizer.to_str()``); hashing the Python object
    itself is unreliable (its state changes as it is used), which would defeat the cache. For the same reason the
    truncation and padding settings are left out: a call with ``truncation=True`` leaves them set on the backend,
    and packing never truncates or pads.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        definition = json.dumps(pipeline, sort_keys=True)
    else:
        definition = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return stable_hash(type(tokenizer).__name__, definition, special)


def _pack(batch: dict, tokenizer, seq_len: int, separator: int | None) -> dict:
    """Tokenise documents, join them with the separator (EOS) and cut into ``seq_len`` blocks.

    The remainder shorter than a block at the end of each batch of documents is dropped.
    """
    stream: list[int] = []
    for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
    usable = len(stream) - len(stream) % seq_len
    return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}


def pack_dataset(
    documents: Dataset,
    tokenizer,
    seq_len: int,
    num_proc: int | None = None,
    desc: str = "Tokenising and packing",
) -> Dataset:
    """``documents`` (a ``text`` column) as ``seq_len``-token blocks in an ``input_ids`` column (int32)."""
    separator = tokenizer.eos_token_id
    fingerprint = stable_hash(documents._fingerprint, tokenizer_fingerprint(tokenizer), seq_len, PACKING_VERSION)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    return documents.map(
        _pack,
        batched=True,
        batch_size=256,
        remove_columns=documents.column_names,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "separator": separator},
        features=features,
        num_proc=num_proc,
        new_fingerprint=fingerprint,
        desc=desc,
    )


@dataclass
class PreparedData:
    """Packed training and evaluation blocks, ready for the Trainer."""

    train: Dataset
    eval: Dataset
    train_documents: int
    eval_documents: int
    # datasets fingerprints of the packed splits before any block selection (a recorded teacher checks them).
    source_fingerprints: dict[str, str] | None = None

    @property
    def train_tokens(self) -> int:
        return len(self.train) * len(self.train[0]["input_ids"]) if len(self.train) else 0


def prepare_datasets(
    args: DataArguments, tokenizer, seq_len: int, seed: int = 42, block_index: bool = False
) -> PreparedData:
    """Load, split, tokenise and pack; errors name the problem (empty data, text too short, ...).

    ``block_index=True`` adds a ``block_index`` column (the block's row in its packed split, before any
    selection) and a ``block_split`` column (0 train, 1 eval): they name the rows of a recorded teacher.
    """
    documents = load_documents(args)
    packed = {}
    # Prompt/completion samples (a synth folder, default text field): chat-rendered, prompt tokens masked.
    structured = REQUEST_COLUMN in documents["train"].column_names and args.dataset_text_field == "text"
    for split in ("train", "eval"):
        if structured:
            blocks = pack_synth_dataset(
                documents[split], tokenizer, seq_len, args.prompt_loss, args.preprocessing_num_workers,
                desc=f"Packing {split} samples",
            )  # fmt: skip
        else:
            blocks = pack_dataset(
                documents[split], tokenizer, seq_len, args.preprocessing_num_workers, desc=f"Packing {split} blocks"
            )
        if len(blocks) == 0:
            raise DataError(
                f"The {split} split of {args.dataset!r} holds fewer than seq_len={seq_len} tokens, so no block "
                "could be packed. Use more text or a smaller --seq_len."
            )
        if block_index:
            blocks = blocks.add_column("block_index", list(range(len(blocks))))
            blocks = blocks.add_column("block_split", [BLOCK_SPLITS[split]] * len(blocks))
        packed[split] = blocks
    source_fingerprints = {split: blocks._fingerprint for split, blocks in packed.items()}
    train, evaluation = packed["train"], packed["eval"]
    if args.max_train_blocks is not None and len(train) > args.max_train_blocks:
        train = train.shuffle(seed=seed).select(range(args.max_train_blocks))
    if args.max_eval_blocks is not None and len(evaluation) > args.max_eval_blocks:
        # A fixed seed: the same eval blocks for every run, so perplexities are comparable across runs.
        evaluation = evaluation.shuffle(seed=0).select(range(args.max_eval_blocks))
    return PreparedData(train, evaluation, len(documents["train"]), len(documents["eval"]), source_fingerprints)


class BlockCollator:
    """Batches token blocks: pads to the longest, ``labels`` = ids with padding as -100.

    A ``labels`` column in the dataset (e.g. prompts masked with -100 in synthetic data) is kept as given;
    ``block_index``/``block_split`` columns (rows of a recorded teacher) are passed through as tensors.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            given = feature.get("labels")
            labels[row, : len(ids)] = ids if given is None else torch.as_tensor(given, dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for name in BLOCK_COLUMNS:
            if name in features[0]:
                batch[name] = torch.tensor([f[name] for f in features], dtype=torch.long)
        return batch


BLOCK_COLUMNS = ("block_index", "block_split")
