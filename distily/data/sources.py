"""Where documents come from: the built-in ``python-stdlib`` corpus, folders of files, data files, saved and Hub
datasets, ``distily synth`` folders; and how they are split into train and eval documents."""

from __future__ import annotations

import glob
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError

from ..config import DataArguments
from ..errors import DataError
from .hashing import eval_bucket, is_eval_key, stable_hash
from .synth_format import is_synth_folder, load_synth_documents

logger = logging.getLogger(__name__)

PYTHON_STDLIB = "python-stdlib"
EVAL_SPLIT_NAMES = ("validation", "eval", "test")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
# Folders never read as corpus: installed third-party packages, caches and VCS metadata.
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", "node_modules", ".venv"}


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


def split_files(relative: list[str], eval_fraction: float, where: str = "folder") -> dict[str, list[str]]:
    """Train and eval files of a folder, by the hash of each path (:func:`is_eval_key`), both sides non-empty.

    A small folder can hash every file to one side (40 files at the default 5% leave eval empty about 13% of the
    time). Then the file closest to the other side moves there -- the train file with the smallest bucket into
    eval, or the eval file with the largest into train -- deterministically, and the log says so.
    """
    splits: dict[str, list[str]] = {"train": [], "eval": []}
    for rel in relative:
        splits["eval" if is_eval_key(rel, eval_fraction) else "train"].append(rel)
    for empty, full, pick in (("eval", "train", min), ("train", "eval", max)):
        if not splits[empty] and len(splits[full]) >= 2:
            moved = pick(splits[full], key=eval_bucket)
            splits[full].remove(moved)
            splits[empty].append(moved)
            logger.warning(
                "Dataset %s: --eval_fraction %g put none of its %d files in the %s split; moved %r there (the file "
                "whose path hash is closest to it) so both splits have files.",
                where, eval_fraction, len(relative), empty, moved,
            )  # fmt: skip
    return splits


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
    if len(relative) < 2:
        raise DataError(
            f"Dataset folder {str(root)!r} has {len(relative)} file(s): too few to hold out an eval split with "
            f"--eval_fraction {eval_fraction}. Add files or raise --eval_fraction."
        )
    splits = split_files(relative, eval_fraction, str(root))
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
