"""Corpora, deterministic splits, packing into blocks, the datasets cache and the collator."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

import distily.data.packing as data_module  # where the packing function lives (patched below)
from distily.config import DataArguments
from distily.data import (
    BlockCollator,
    DataError,
    _pack,
    files_dataset,
    is_eval_key,
    list_text_files,
    load_documents,
    pack_dataset,
    prepare_datasets,
    python_stdlib_root,
    tokenizer_fingerprint,
)

from .conftest import SAMPLE_TEXT, make_tiny_tokenizer

SEQ_LEN = 32


def data_args(dataset, tmp_path: Path, **overrides) -> DataArguments:
    """DataArguments that always cache under the test's own folder (never the user's HF cache)."""
    return DataArguments(dataset=str(dataset), dataset_cache_dir=str(tmp_path / "hf_cache"), **overrides)


def blocks(dataset) -> list[list[int]]:
    return [list(row) for row in dataset["input_ids"]]


def packed_stream(texts: list[str], tokenizer) -> list[int]:
    """The documents tokenised and joined by EOS, as packing does before cutting."""
    stream = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.eos_token_id)
    return stream


def cache_state(cache_dir: Path) -> dict[str, int]:
    """Every file under the cache, with its modification time."""
    return {str(p.relative_to(cache_dir)): p.stat().st_mtime_ns for p in cache_dir.rglob("*") if p.is_file()}


class CharTokenizer:
    """Token id = code point; enough for ``_pack``, which only calls the tokenizer."""

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Packing


def test_pack_golden():
    batch = {"text": ["abc", "de", "fghij"]}
    # stream: a b c EOS d e EOS f g h i j EOS = 13 ids; the last id (13 % 4 = 1) is dropped.
    assert _pack(batch, CharTokenizer(), seq_len=4, separator=0) == {
        "input_ids": [[97, 98, 99, 0], [100, 101, 0, 102], [103, 104, 105, 106]]
    }
    # Without a separator documents are simply concatenated: 10 ids -> 3 blocks of 3, one id dropped.
    assert _pack(batch, CharTokenizer(), seq_len=3, separator=None) == {
        "input_ids": [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    }
    # Shorter than one block: nothing.
    assert _pack({"text": ["ab"]}, CharTokenizer(), seq_len=4, separator=0) == {"input_ids": []}


def test_prepare_blocks_are_the_eos_joined_documents(text_corpus, tmp_path, tiny_tokenizer):
    args = data_args(text_corpus, tmp_path)
    prepared = prepare_datasets(args, tiny_tokenizer, SEQ_LEN)
    documents = load_documents(args)

    assert prepared.train_documents == len(documents["train"]) and prepared.eval_documents == len(documents["eval"])
    assert prepared.train_documents + prepared.eval_documents == 40
    assert prepared.train.column_names == ["input_ids"]
    assert prepared.train.features["input_ids"].feature.dtype == "int32"
    for split, packed in (("train", prepared.train), ("eval", prepared.eval)):
        rows = blocks(packed)
        assert rows and all(len(row) == SEQ_LEN for row in rows)
        assert all(isinstance(token, int) for row in rows for token in row)
        # Fewer than 256 documents: one map batch, so the blocks are the whole stream minus its tail.
        stream = packed_stream(list(documents[split]["text"]), tiny_tokenizer)
        assert len(rows) == len(stream) // SEQ_LEN
        assert [token for row in rows for token in row] == stream[: len(rows) * SEQ_LEN]
    assert prepared.train_tokens == len(prepared.train) * SEQ_LEN
    # The text round-trips through the tokenizer.
    first_doc = documents["train"][0]["text"]
    assert tiny_tokenizer.decode(blocks(prepared.train)[0]) == tiny_tokenizer.decode(
        tiny_tokenizer(first_doc, add_special_tokens=False)["input_ids"][:SEQ_LEN]
    )


def test_pack_dataset_drops_the_remainder_of_each_map_batch(tiny_tokenizer):
    texts = [f"x = {i} * {i}\n" + "y" * (i % 7) for i in range(300)]
    packed = pack_dataset(datasets.Dataset.from_dict({"text": texts}), tiny_tokenizer, seq_len=SEQ_LEN)
    eos = tiny_tokenizer.eos_token_id
    expected = (
        _pack({"text": texts[:256]}, tiny_tokenizer, SEQ_LEN, eos)["input_ids"]
        + _pack({"text": texts[256:]}, tiny_tokenizer, SEQ_LEN, eos)["input_ids"]
    )
    assert blocks(packed) == expected
    # The test is only meaningful if the first batch had a remainder to drop.
    whole = packed_stream(texts, tiny_tokenizer)
    assert blocks(packed) != [whole[i : i + SEQ_LEN] for i in range(0, len(expected) * SEQ_LEN, SEQ_LEN)]


# ----------------------------------------------------------------------------------------------------------------
# Deterministic train/eval split


def split_paths(args: DataArguments) -> dict[str, set[str]]:
    documents = load_documents(args)
    return {split: set(list(documents[split]["path"])) for split in ("train", "eval")}


def test_folder_split_is_deterministic_and_by_path_hash(text_corpus, tmp_path):
    args = data_args(text_corpus, tmp_path, eval_fraction=0.2)
    first, second = split_paths(args), split_paths(args)
    assert first == second
    every = {p.name for p in text_corpus.iterdir()}
    assert first["train"] | first["eval"] == every and not first["train"] & first["eval"]
    assert first["eval"] == {name for name in every if is_eval_key(name, 0.2)}
    assert first["eval"]  # 0.2 of 40 files: the corpus fixture has some in eval

    # Adding files moves none of the existing ones.
    for index in range(10):
        (text_corpus / f"extra_{index}.py").write_text(f"z = {index}\n")
    grown = split_paths(args)
    assert grown["eval"] & every == first["eval"] and grown["train"] & every == first["train"]

    # Renaming a file re-draws its side: the same content moves from eval to train.
    moved = sorted(first["eval"])[0]
    new_name = next(f"renamed_{k}.py" for k in range(1000) if not is_eval_key(f"renamed_{k}.py", 0.2))
    (text_corpus / moved).rename(text_corpus / new_name)
    renamed = split_paths(args)
    assert new_name in renamed["train"] and moved not in renamed["eval"]
    assert renamed["eval"] == grown["eval"] - {moved}


def test_eval_fraction_is_roughly_respected(tmp_path):
    keys = [f"pkg/module_{i}.py" for i in range(20_000)]
    for fraction in (0.05, 0.2, 0.5):
        share = sum(is_eval_key(key, fraction) for key in keys) / len(keys)
        assert abs(share - fraction) < 0.01, (fraction, share)

    root = tmp_path / "many"
    root.mkdir()
    for index in range(300):
        (root / f"file_{index:03d}.txt").write_text(f"document {index}\n")
    split = files_dataset(root, 0.2, str(tmp_path / "hf_cache"))
    assert len(split["train"]) + len(split["eval"]) == 300
    assert 40 <= len(split["eval"]) <= 80  # 60 expected, sd ~7
    assert sorted(list(split["eval"]["path"])) == sorted(f.name for f in root.iterdir() if is_eval_key(f.name, 0.2))


def test_is_eval_key_golden():
    # sha1 of the key, not hash(): the same in every process (PYTHONHASHSEED) and Python version.
    keys = [f"a/b_{i}.py" for i in range(100)]
    held_out = [i for i, key in enumerate(keys) if is_eval_key(key, 0.3)]
    assert held_out == [
        1, 3, 9, 17, 22, 23, 24, 30, 37, 40, 45, 50, 51, 53, 58,
        65, 67, 70, 75, 76, 79, 82, 83, 84, 88, 90, 91, 92, 94, 98,
    ]  # fmt: skip
    # Raising the fraction only adds documents to eval.
    assert [i for i, key in enumerate(keys) if is_eval_key(key, 0.05)] == [3, 65]
    assert not is_eval_key("a/b_0.py", 0.68) and is_eval_key("a/b_0.py", 0.69)  # sha1 starts ae68a1d9: 0.6813


def test_data_file_split_is_by_content_hash(tmp_path):
    texts = [f"row {i}: " + "abc " * (i % 9) for i in range(120)]
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": text} for text in texts])
    documents = load_documents(data_args(path, tmp_path, eval_fraction=0.25))
    assert list(documents["eval"]["text"]) == [t for t in texts if is_eval_key(t, 0.25)]
    assert list(documents["train"]["text"]) == [t for t in texts if not is_eval_key(t, 0.25)]


# ----------------------------------------------------------------------------------------------------------------
# The datasets cache


def test_second_prepare_reuses_the_cache(text_corpus, tmp_path, monkeypatch):
    calls = []
    real_pack = data_module._pack

    def counting_pack(batch, *args, **kwargs):
        calls.append(len(batch["text"]))
        return real_pack(batch, *args, **kwargs)

    monkeypatch.setattr(data_module, "_pack", counting_pack)
    cache = tmp_path / "hf_cache"
    args = data_args(text_corpus, tmp_path)

    first = prepare_datasets(args, make_tiny_tokenizer(), SEQ_LEN)
    assert sum(calls) == 40  # every document tokenised once
    state = cache_state(cache)
    arrow_files = {name for name in state if name.endswith(".arrow")}
    assert {Path(f["filename"]).name for f in first.train.cache_files} <= {Path(n).name for n in arrow_files}

    # A new tokenizer object, built the same way and used with truncation and padding in between.
    tokenizer = make_tiny_tokenizer()
    tokenizer(["def f(x): return x"] * 2, truncation=True, max_length=4, padding="max_length")
    calls.clear()
    second = prepare_datasets(args, tokenizer, SEQ_LEN)
    assert calls == []  # nothing tokenised again
    assert cache_state(cache) == state  # no new file, none rewritten
    assert second.train.cache_files == first.train.cache_files
    assert second.eval.cache_files == first.eval.cache_files
    assert blocks(second.train) == blocks(first.train) and blocks(second.eval) == blocks(first.eval)

    # A different seq_len is a new entry (train and eval), next to the old one.
    other = prepare_datasets(args, tokenizer, 16)
    assert sum(calls) == 40
    added = set(cache_state(cache)) - set(state)
    assert len([name for name in added if name.endswith(".arrow")]) == 2
    assert other.train.cache_files != first.train.cache_files
    assert all(len(row) == 16 for row in blocks(other.train))

    # Changed corpus content is a new entry too, and the new text is in the blocks.
    calls.clear()
    before = cache_state(cache)
    target = sorted(split_paths(args)["train"])[0]
    (text_corpus / target).write_text("changed = True\n" * 30)
    changed = prepare_datasets(args, tokenizer, SEQ_LEN)
    assert sum(calls) > 0
    assert changed.train.cache_files != first.train.cache_files
    assert {n for n in set(cache_state(cache)) - set(before) if n.endswith(".arrow")}
    assert "changed = True" in tokenizer.decode([t for row in blocks(changed.train) for t in row])


def test_tokenizer_fingerprint():
    tokenizer = make_tiny_tokenizer()
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(make_tiny_tokenizer()) == fingerprint
    tokenizer(["some text"], truncation=True, max_length=2, padding="max_length")
    assert tokenizer_fingerprint(tokenizer) == fingerprint  # using a tokenizer does not change its key
    assert tokenizer_fingerprint(make_tiny_tokenizer(vocab_size=120)) != fingerprint  # other merges
    assert tokenizer_fingerprint(make_tiny_tokenizer(texts=["zzzz yyyy " * 50])) != fingerprint
    different_eos = make_tiny_tokenizer()
    different_eos.eos_token = "<unk>"
    assert tokenizer_fingerprint(different_eos) != fingerprint


# ----------------------------------------------------------------------------------------------------------------
# Data files and saved datasets


def test_jsonl_with_custom_text_field(tmp_path, tiny_tokenizer):
    rows = [{"content": f"def g{i}(): return {i}\n" * (1 + i % 3), "id": i} for i in range(60)]
    path = write_jsonl(tmp_path / "code.jsonl", rows)
    args = data_args(path, tmp_path, dataset_text_field="content")
    documents = load_documents(args)
    assert documents["train"].column_names == ["text", "id"]
    assert sorted(list(documents["train"]["text"]) + list(documents["eval"]["text"])) == sorted(
        r["content"] for r in rows
    )
    prepared = prepare_datasets(args, tiny_tokenizer, 16)
    assert prepared.train_documents + prepared.eval_documents == 60
    stream = packed_stream(list(documents["train"]["text"]), tiny_tokenizer)
    assert [t for row in blocks(prepared.train) for t in row] == stream[: len(prepared.train) * 16]


def test_txt_files_are_one_document_each(tmp_path, tiny_tokenizer):
    folder = tmp_path / "txt"
    folder.mkdir()
    texts = {f"part_{i:02d}.txt": f"Paragraph {i}.\n\nSecond line of {i}.\n" for i in range(30)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    args = data_args(f"{folder}/*.txt", tmp_path)
    documents = load_documents(args)
    assert sorted(list(documents["train"]["text"]) + list(documents["eval"]["text"])) == sorted(texts.values())
    prepared = prepare_datasets(args, tiny_tokenizer, 16)
    assert (prepared.train_documents, prepared.eval_documents) == (len(documents["train"]), len(documents["eval"]))
    assert prepared.train_documents + prepared.eval_documents == 30
    # Comma-separated files work too (one that hashes to eval, one to train).
    held_out = next(name for name, text in texts.items() if is_eval_key(text, 0.5))
    kept = next(name for name, text in texts.items() if not is_eval_key(text, 0.5))
    two = load_documents(data_args(f"{folder}/{held_out}, {folder}/{kept}", tmp_path, eval_fraction=0.5))
    assert (list(two["train"]["text"]), list(two["eval"]["text"])) == ([texts[kept]], [texts[held_out]])


def test_single_txt_file_is_split_into_paragraphs(tmp_path):
    paragraphs = [f"Paragraph number {i}.\nIt has two lines." for i in range(40)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paragraphs) + "\n\n\n")
    documents = load_documents(data_args(path, tmp_path, eval_fraction=0.2))
    found = [text.strip() for text in list(documents["train"]["text"]) + list(documents["eval"]["text"])]
    assert sorted(found) == sorted(paragraphs)
    assert 0 < len(documents["eval"]) < 40


def test_blank_rows_are_not_documents(tmp_path):
    rows = [{"text": f"row {i} has text"} for i in range(30)] + [{"text": "   "}, {"text": ""}, {"text": None}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    documents = load_documents(data_args(path, tmp_path, eval_fraction=0.2))
    assert len(documents["train"]) + len(documents["eval"]) == 30


def test_parquet_file(tmp_path, tiny_tokenizer):
    texts = [f"parquet row {i} " * (2 + i % 4) for i in range(80)]
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"text": texts, "n": list(range(80))}).to_parquet(str(path))
    args = data_args(path, tmp_path)
    documents = load_documents(args)
    assert sorted(list(documents["train"]["text"]) + list(documents["eval"]["text"])) == sorted(texts)
    prepared = prepare_datasets(args, tiny_tokenizer, 16)
    stream = packed_stream(list(documents["eval"]["text"]), tiny_tokenizer)
    assert [t for row in blocks(prepared.eval) for t in row] == stream[: len(prepared.eval) * 16]


@pytest.fixture
def saved_dataset(tmp_path) -> tuple[Path, list[str], list[str]]:
    train = [f"training text number {i}. " * 3 for i in range(20)]
    validation = [f"held out text {i}. " * 3 for i in range(5)]
    path = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train}),
            "validation": datasets.Dataset.from_dict({"text": validation}),
        }
    ).save_to_disk(str(path))
    return path, train, validation


def test_saved_dataset_uses_its_validation_split(saved_dataset, tmp_path, tiny_tokenizer):
    path, train, validation = saved_dataset
    args = data_args(path, tmp_path)
    documents = load_documents(args)
    assert list(documents["train"]["text"]) == train  # nothing held out of train
    assert list(documents["eval"]["text"]) == validation
    prepared = prepare_datasets(args, tiny_tokenizer, 16)
    assert (prepared.train_documents, prepared.eval_documents) == (20, 5)
    stream = packed_stream(validation, tiny_tokenizer)
    assert blocks(prepared.eval) == [stream[i : i + 16] for i in range(0, len(stream) - len(stream) % 16, 16)]


def test_missing_eval_split_lists_the_splits(saved_dataset, tmp_path):
    path, _, _ = saved_dataset
    with pytest.raises(DataError, match=r"no split 'dev'; it has \['train', 'validation'\].*--dataset_eval_split"):
        load_documents(data_args(path, tmp_path, dataset_eval_split="dev"))
    with pytest.raises(
        DataError, match=r"no split 'training'; it has \['train', 'validation'\].*--dataset_train_split"
    ):
        load_documents(data_args(path, tmp_path, dataset_train_split="training"))


# ----------------------------------------------------------------------------------------------------------------
# Errors name the problem and the fix


def test_empty_data_file(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"is empty.*Point --dataset at files that hold text"):
        prepare_datasets(data_args(tmp_path / "empty.jsonl", tmp_path), tiny_tokenizer, SEQ_LEN)
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})).to_parquet(
        str(path)
    )
    with pytest.raises(DataError, match=r"is empty"):
        prepare_datasets(data_args(path, tmp_path), tiny_tokenizer, SEQ_LEN)


def test_folder_of_blank_files(tmp_path, tiny_tokenizer):
    folder = tmp_path / "blank"
    folder.mkdir()
    for index in range(30):
        (folder / f"{index}.txt").write_text("  \n\n")
    with pytest.raises(DataError, match=r"holds text \(they are empty, blank, binary or not UTF-8\).*--dataset"):
        prepare_datasets(data_args(folder, tmp_path), tiny_tokenizer, SEQ_LEN)


def test_missing_text_field_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"body": f"x{i}", "id": i} for i in range(10)])
    with pytest.raises(
        DataError, match=r"no text column 'text'; its columns are \['body', 'id'\].*--dataset_text_field"
    ):
        load_documents(data_args(path, tmp_path))
    with pytest.raises(DataError, match=r"no text column 'content'"):
        load_documents(data_args(path, tmp_path, dataset_text_field="content"))


@pytest.mark.parametrize("spec", ["./nope", "/tmp/distily-missing/a/b", "~/distily-missing-folder"])
def test_nonexistent_path(spec, tmp_path):
    with pytest.raises(DataError, match=r"does not exist\. Pass an existing folder or data file to --dataset"):
        load_documents(data_args(spec, tmp_path))


def test_nonexistent_data_file(tmp_path):
    with pytest.raises(DataError, match=r"Data file '.*missing\.jsonl' does not exist\. Check the path"):
        load_documents(data_args(tmp_path / "missing.jsonl", tmp_path))
    with pytest.raises(DataError, match=r"does not exist"):
        load_documents(data_args(f"{tmp_path}/nothing_*.parquet", tmp_path))


def test_folder_with_no_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"contains no files\. Point --dataset at a folder with text"):
        load_documents(data_args(empty, tmp_path))
    # Hidden files, caches and installed packages do not count.
    (empty / ".hidden.py").write_text("x = 1\n")
    for skipped in ("__pycache__", "site-packages", ".git"):
        (empty / skipped).mkdir()
        (empty / skipped / "m.py").write_text("x = 1\n")
    assert list_text_files(empty) == []
    with pytest.raises(DataError, match=r"contains no files"):
        load_documents(data_args(empty, tmp_path))


def test_corpus_shorter_than_seq_len(text_corpus, tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match=r"fewer than seq_len=100000 tokens.*smaller --seq_len"):
        prepare_datasets(data_args(text_corpus, tmp_path), tiny_tokenizer, 100_000)


def test_too_few_documents_for_an_eval_split(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": "a" * 100}, {"text": "b" * 100}])
    with pytest.raises(DataError, match=r"has 2 document\(s\): too few.*--eval_fraction 0\.05.*--dataset_eval_split"):
        prepare_datasets(data_args(path, tmp_path), tiny_tokenizer, 8)
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "only.py").write_text(SAMPLE_TEXT)
    with pytest.raises(DataError, match=r"has 1 file\(s\): too few.*Add files or raise --eval_fraction"):
        prepare_datasets(data_args(folder, tmp_path), tiny_tokenizer, 8)


# ----------------------------------------------------------------------------------------------------------------
# python-stdlib


def test_python_stdlib_files():
    root = python_stdlib_root()
    assert (root / "os.py").is_file() and (root / "json" / "__init__.py").is_file()
    files = list_text_files(root, (".py",))
    assert len(files) > 1000
    assert all(f.suffix == ".py" for f in files)
    assert not [f for f in files if "site-packages" in f.parts or "dist-packages" in f.parts]
    assert not [f for f in files if "__pycache__" in f.parts]
    assert len(set(files)) == len(files)

    relative = [str(f.relative_to(root)) for f in files]
    assert relative == [str(f.relative_to(root)) for f in list_text_files(root, (".py",))]
    eval_files = [rel for rel in relative if is_eval_key(rel, 0.05)]
    assert 0.03 < len(eval_files) / len(relative) < 0.07
    assert eval_files == [rel for rel in relative if is_eval_key(rel, 0.05)]


# ----------------------------------------------------------------------------------------------------------------
# Collator


def test_block_collator_pads_and_masks():
    batch = BlockCollator(pad_token_id=7)([{"input_ids": [5, 6, 9]}, {"input_ids": [8]}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 9], [8, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 9], [8, -100, -100]]


def test_block_collator_keeps_given_labels():
    features = [{"input_ids": [5, 6, 9], "labels": [-100, -100, 9]}, {"input_ids": [3, 4]}]
    batch = BlockCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 9], [3, 4, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 9], [3, 4, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


# ----------------------------------------------------------------------------------------------------------------
# Block limits


def test_block_limits(text_corpus, tmp_path, tiny_tokenizer):
    full = prepare_datasets(data_args(text_corpus, tmp_path, max_eval_blocks=None), tiny_tokenizer, 16)
    all_train, all_eval = blocks(full.train), blocks(full.eval)
    assert len(all_train) > 10 and len(all_eval) > 4

    limited = data_args(text_corpus, tmp_path, max_train_blocks=10, max_eval_blocks=4)
    one = prepare_datasets(limited, tiny_tokenizer, 16, seed=1)
    two = prepare_datasets(limited, tiny_tokenizer, 16, seed=2)
    assert len(one.train) == 10 and len(one.eval) == 4
    assert all(row in all_train for row in blocks(one.train))
    assert len({tuple(row) for row in blocks(one.train)}) == 10  # sampled without replacement
    assert blocks(one.train) != blocks(two.train)  # the training sample follows the seed ...
    assert blocks(one.eval) == blocks(two.eval)  # ... the eval sample does not
    assert all(row in all_eval for row in blocks(one.eval))
    # Limits above the available count change nothing; document counts are unaffected.
    generous = prepare_datasets(data_args(text_corpus, tmp_path, max_train_blocks=10**6), tiny_tokenizer, 16)
    assert blocks(generous.train) == all_train
    assert one.train_documents == full.train_documents


def test_a_small_folder_whose_hashes_leave_eval_empty_moves_one_file_there(tmp_path, caplog):
    """40 files at the default 5%: the path hashes of these 40 all fall on the train side (as for about 13% of
    40-file folders); the file with the smallest hash bucket moves to eval, the same one every time."""
    from distily.data import eval_bucket

    folder = tmp_path / "forty"
    folder.mkdir()
    names = [f"mod6_{i:02d}.py" for i in range(40)]
    assert not any(is_eval_key(name, 0.05) for name in names)
    for index, name in enumerate(names):
        (folder / name).write_text(f"def f{index}(x):\n    return x + {index}\n")
    with caplog.at_level("WARNING", logger="distily.data.sources"):
        documents = files_dataset(folder, 0.05, str(tmp_path / "cache"))
    expected = min(names, key=eval_bucket)
    assert documents["eval"]["path"] == [expected]
    assert sorted(documents["train"]["path"]) == sorted(set(names) - {expected})
    assert f"moved {expected!r} there" in caplog.text and "none of its 40 files in the eval split" in caplog.text
    again = files_dataset(folder, 0.05, str(tmp_path / "cache2"))
    assert again["eval"]["path"] == [expected]
