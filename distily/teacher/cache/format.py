"""The folder format of a recorded teacher, and :class:`TeacherCache`, the one object that owns it.

Layout of a cache folder::

    manifest.json                 what produced it (teacher, weights hash, tokenizer, data, settings, shards)
    tokenizer/                    the teacher's tokenizer (training needs no --teacher)
    teacher_config/config.json    the teacher's config (a student can be built from it)
    train/index.safetensors       block_index of each recorded row, in recording order
    train/shard-00000.safetensors rows [0, R), R = rows_per_shard blocks of seq_len tokens
    eval/...                      the same for the eval blocks

Each shard holds, for its rows (blocks) and their ``P = seq_len − 1`` next-token positions (a block's last
position predicts nothing training uses): ``top_ids`` ``(R, P, k)`` uint16 (int32 for vocabularies over
65,536), ``top_logprobs`` ``(R, P, k)`` and ``tail_logprob`` ``(R, P)`` in float16 or bfloat16, and per row
``block_index``, ``input_hash`` (a hash of the block's token ids, checked against every training batch) and
``teacher_nll`` (the teacher's summed cross-entropy over the block, from the full logits). With tail samples,
``tail_sample_ids`` ``(R, P, S)`` and ``tail_sample_logprobs`` ``(R, P, S)`` too. At k = 64 that is
``(64·2 + 64·2 + 2) · (L − 1)/L`` bytes per token without samples (257.5 at L = 512), plus ``S · 4`` with
(289.5 with the default S = 8).

Shards are written atomically (temporary file, then rename) and the manifest after each one, so a recording
killed at any point is finished by running the same command again. Every shard's sha256 is in the manifest;
a shard is checked the first time training reads it, and a mismatch stops training.

:class:`TeacherCache` opens a folder for training: it checks the format, the recording's completeness and its
compatibility with the run, finds and verifies the rows of a batch's blocks and hands them to
:mod:`distily.teacher.cache.reader`. The writing primitives (:func:`new_manifest`, :func:`write_index`,
:func:`write_shard`) are what :mod:`distily.teacher.cache.writer` records with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ...data import BLOCK_SPLITS, tokenizer_fingerprint
from ...errors import CacheError
from ...io import atomic_path
from ...sparse import check_bucket_loss
from .reader import RecordedSignal, recorded_signal

CACHE_FORMAT = "distily-teacher-cache"
CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TEACHER_CONFIG_DIR = "teacher_config"
# Split names and the ids the ``block_split`` column uses for them.
SPLIT_IDS = BLOCK_SPLITS
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# What training reads per row.
ROW_TENSORS = ("top_ids", "top_logprobs", "tail_logprob", "input_hash", "teacher_nll")
SAMPLE_TENSORS = ("tail_sample_ids", "tail_sample_logprobs")  # in caches recorded with tail samples
# The recording settings a cache's identity holds and training checks.
SETTING_KEYS = (
    "seq_len", "top_k", "tail_samples", "temperature", "logprob_dtype", "id_dtype", "rows_per_shard", "vocab_size"
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Names, sizes and hashes


def shard_name(split: str, index: int) -> str:
    """The path of shard ``index`` of ``split``, relative to the cache folder."""
    return f"{split}/shard-{index:05d}.safetensors"


def index_name(split: str) -> str:
    """The path of ``split``'s block index (the block_index of each recorded row), relative to the cache folder."""
    return f"{split}/index.safetensors"


def bytes_per_token(settings: dict[str, Any]) -> float:
    """Stored bytes per token of a cache with these settings (ids, log-probabilities, tail, tail samples; per-row
    extras)."""
    k, length, samples = settings["top_k"], settings["seq_len"], settings.get("tail_samples", 0)
    id_bytes = 2 if settings["id_dtype"] == "uint16" else 4
    per_position = (k + samples) * (id_bytes + 2) + 2
    per_row = 8 + 8 + 4  # block_index, input_hash, teacher_nll
    return (per_position * (length - 1) + per_row) / length


def sha256_file(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def block_hash(input_ids: Tensor) -> int:
    """A 63-bit hash of one block's token ids: recorded with each row, compared with every training batch."""
    data = input_ids.detach().to("cpu", torch.int32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# Writing (the recording in distily.teacher.cache.writer decides what and when)


def new_manifest(identity: dict[str, Any], created_at: str) -> dict[str, Any]:
    """The manifest of a recording that has just started: format, identity, no split recorded yet."""
    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "status": "recording",
        "identity": identity,
        "created_at": created_at,
        "splits": {},
    }


def write_index(path: Path, block_index: list[int]) -> None:
    """The block index of a split (the block_index of each row, in recording order), written atomically."""
    with atomic_path(path) as tmp:
        save_file({"block_index": torch.tensor(block_index, dtype=torch.int64)}, str(tmp))


def write_shard(path: Path, rows: dict[str, Tensor], settings: dict[str, Any]) -> None:
    """One shard's rows in the stored dtypes (``settings``' id and log-probability types), written atomically."""
    id_dtype = torch.uint16 if settings["id_dtype"] == "uint16" else torch.int32
    lp_dtype = LOGPROB_DTYPES[settings["logprob_dtype"]]
    tensors = {
        "block_index": rows["block_index"].to(torch.int64),
        "input_hash": rows["input_hash"].to(torch.int64),
        "teacher_nll": rows["nll"].to(torch.float32),
        "top_ids": rows["ids"].to(id_dtype).contiguous(),
        "top_logprobs": rows["logprobs"].to(lp_dtype).contiguous(),
        "tail_logprob": rows["tail_logprob"].to(lp_dtype).contiguous(),
    }
    if settings["tail_samples"]:
        tensors["tail_sample_ids"] = rows["sample_ids"].to(id_dtype).contiguous()
        tensors["tail_sample_logprobs"] = rows["sample_logprobs"].to(lp_dtype).contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CACHE_FORMAT})


# ----------------------------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """A recorded teacher, opened for training: rows are read lazily from memory-mapped shards.

    ``verify="lazy"`` (default) checks a shard's sha256 the first time it is read, ``"all"`` checks every shard
    now. A shard that fails is refused with :class:`CacheError`; nothing from it is ever returned.
    """

    def __init__(self, path: str | Path, verify: str = "lazy", allow_incomplete: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise CacheError(
                f"--teacher_cache {str(path)!r} is not a teacher cache (no {MANIFEST}). Record one with "
                "`distily record --teacher ... --output DIR`."
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT or self.manifest.get("format_version") != CACHE_FORMAT_VERSION:
            raise CacheError(
                f"{str(path)!r} is not a teacher cache of format {CACHE_FORMAT} v{CACHE_FORMAT_VERSION} "
                f"(found {self.manifest.get('format')} v{self.manifest.get('format_version')}). Record it again."
            )
        if self.manifest.get("status") != "complete" and not allow_incomplete:
            raise CacheError(
                f"The recording in {str(path)!r} is unfinished. Run the same `distily record` command again to "
                "complete it (finished shards are kept)."
            )
        identity = self.manifest["identity"]
        # Caches recorded before tail samples existed have none.
        self.settings = {key: identity[key] if key != "tail_samples" else identity.get(key, 0) for key in SETTING_KEYS}
        self.row_tensors = ROW_TENSORS + (SAMPLE_TENSORS if self.settings["tail_samples"] else ())
        self.identity = identity
        self._handles: dict[tuple[str, int], Any] = {}
        self._slice_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self._verified: set[tuple[str, int]] = set()
        self._rows: dict[str, np.ndarray] = {}
        if verify == "all":
            for split in SPLIT_IDS:
                for shard in range(len(self.manifest["splits"][split]["shards"])):
                    self._verify(split, shard)

    # -- properties ------------------------------------------------------------------------------------------

    @property
    def top_k(self) -> int:
        return self.settings["top_k"]

    @property
    def tail_samples(self) -> int:
        return self.settings["tail_samples"]

    @property
    def seq_len(self) -> int:
        return self.settings["seq_len"]

    @property
    def temperature(self) -> float:
        return float(self.settings["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.settings["vocab_size"])

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / TOKENIZER_DIR))

    def teacher_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.path / TEACHER_CONFIG_DIR))

    # -- checks ----------------------------------------------------------------------------------------------

    def check_compatible(
        self,
        *,
        seq_len: int | None = None,
        temperature: float | None = None,
        tokenizer=None,
        vocab_size: int | None = None,
        loss: str | None = None,
        source_fingerprints: dict[str, str] | None = None,
    ) -> None:
        """Refuse training settings this recording does not fit, naming what differs."""
        where = f"the teacher cache {str(self.path)!r}"
        if seq_len is not None and seq_len != self.seq_len:
            raise CacheError(
                f"--seq_len {seq_len} differs from {where}, recorded with seq_len {self.seq_len}: its rows are other "
                f"blocks. Train with --seq_len {self.seq_len}, or record again with --seq_len {seq_len}."
            )
        if temperature is not None and float(temperature) != self.temperature:
            raise CacheError(
                f"--temperature {temperature} differs from {where}, recorded at temperature {self.temperature} (it "
                f"stores softmax(logits / T)). Train with --temperature {self.temperature}, or record again."
            )
        if tokenizer is not None and tokenizer_fingerprint(tokenizer) != self.identity["tokenizer_fingerprint"]:
            raise CacheError(
                f"The tokenizer differs from the one {where} was recorded with (teacher "
                f"{self.identity['teacher']!r}): token ids would not line up. Use the cache's own tokenizer "
                f"({self.path / TOKENIZER_DIR}) or record again with this one."
            )
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise CacheError(
                f"The student's vocabulary ({vocab_size} tokens) differs from the recorded teacher's "
                f"({self.vocab_size}) in {where}. Build the student from the cache's teacher config."
            )
        if loss is not None:
            try:
                check_bucket_loss(loss)
            except ValueError as err:
                raise CacheError(str(err)) from None
        for split, fingerprint in (source_fingerprints or {}).items():
            recorded = self.identity["splits"].get(split)
            if recorded != fingerprint:
                data = self.manifest.get("data", {})
                raise CacheError(
                    f"The {split} data differs from what {where} recorded (dataset fingerprint {fingerprint} now, "
                    f"{recorded} recorded from --dataset {data.get('dataset')!r}, eval_fraction "
                    f"{data.get('eval_fraction')}). Train on the recorded data, or record this data."
                )

    def _verify(self, split: str, shard: int) -> None:
        if (split, shard) in self._verified:
            return
        entry = self.manifest["splits"][split]["shards"][shard]
        if entry is None:
            raise CacheError(f"Shard {shard} of the {split} split of {str(self.path)!r} was never recorded.")
        path = self.path / entry["file"]
        if not path.is_file():
            raise CacheError(
                f"Shard {path} is missing from the teacher cache. Run `distily record` again to rewrite it."
            )
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise CacheError(
                f"Shard {path} is corrupted: its sha256 is {actual}, the manifest says {entry['sha256']}. It is not "
                "used. Delete the file and run the same `distily record` command again to rewrite it."
            )
        self._verified.add((split, shard))

    def verify(self) -> None:
        """Check every shard's sha256 now."""
        for split in SPLIT_IDS:
            for shard in range(len(self.manifest["splits"][split]["shards"])):
                self._verify(split, shard)

    # -- rows ------------------------------------------------------------------------------------------------

    def _handle(self, split: str, shard: int):
        key = (split, shard)
        if key not in self._handles:
            self._verify(split, shard)
            self._handles[key] = safe_open(str(self.path / shard_name(split, shard)), framework="pt")
        return self._handles[key]

    def _slices(self, split: str, shard: int) -> dict[str, Any]:
        """The shard's tensors as lazy slices (reading ``[a:b]`` touches only those rows of the memory map)."""
        key = (split, shard)
        if key not in self._slice_cache:
            handle = self._handle(split, shard)
            self._slice_cache[key] = {name: handle.get_slice(name) for name in self.row_tensors}
        return self._slice_cache[key]

    def row_of_block(self, split: str) -> np.ndarray:
        """For each block index, its row in the recording of ``split`` (−1: not recorded)."""
        if split not in self._rows:
            index_path = self.path / index_name(split)
            if sha256_file(index_path) != self.manifest["splits"][split]["index_sha256"]:
                raise CacheError(f"{index_path} is corrupted (sha256 differs from the manifest). Record again.")
            blocks = load_file(str(index_path))["block_index"].numpy()
            rows = np.full(int(blocks.max()) + 1 if len(blocks) else 0, -1, dtype=np.int64)
            rows[blocks] = np.arange(len(blocks))
            self._rows[split] = rows
        return self._rows[split]

    def rows_for(self, split: str, block_indices) -> np.ndarray:
        """The recorded rows of ``block_indices`` in ``split``; a block that was not recorded is an error."""
        table = self.row_of_block(split)
        blocks = np.asarray(block_indices, dtype=np.int64)
        inside = (blocks >= 0) & (blocks < len(table))
        rows = np.where(inside, table[np.clip(blocks, 0, max(len(table) - 1, 0))], -1) if len(table) else blocks * 0 - 1
        missing = blocks[rows < 0]
        if len(missing):
            selection = self.identity.get("selection", {})
            raise CacheError(
                f"{len(missing)} {split} block(s) (e.g. block {int(missing[0])}) are not in the teacher cache "
                f"{str(self.path)!r}, which recorded {self.manifest['splits'][split]['blocks']} {split} blocks "
                f"(max_train_blocks={selection.get('max_train_blocks')}, max_eval_blocks="
                f"{selection.get('max_eval_blocks')}, seed={selection.get('seed')}). Train with the same selection "
                "and --seed, or record the blocks you train on."
            )
        return rows

    def read_rows(self, split: str, rows: np.ndarray) -> dict[str, Tensor]:
        """``top_ids`` (int64), ``top_logprobs``, ``tail_logprob`` (float32), ``input_hash``, ``teacher_nll`` of
        ``rows`` (and ``tail_sample_ids``, ``tail_sample_logprobs`` when recorded), each read from its
        memory-mapped shard (only those rows are touched)."""
        per_shard = self.settings["rows_per_shard"]
        parts: dict[str, list[Tensor]] = {name: [] for name in self.row_tensors}
        for row in rows.tolist():
            slices = self._slices(split, row // per_shard)
            local = row % per_shard
            for name in self.row_tensors:
                parts[name].append(slices[name][local : local + 1])
        out = {name: torch.cat(value) for name, value in parts.items()}
        for name in ("top_ids", "tail_sample_ids"):
            if name in out:
                out[name] = out[name].to(torch.int64)
        for name in ("top_logprobs", "tail_logprob", "tail_sample_logprobs"):
            if name in out:
                out[name] = out[name].float()
        return out

    def total_nll(self, split: str) -> float:
        total = 0.0
        for shard, entry in enumerate(self.manifest["splits"][split]["shards"]):
            if entry is not None:
                total += float(self._handle(split, shard).get_tensor("teacher_nll").double().sum())
        return total

    def signal(self, inputs: dict[str, Tensor], mask: Tensor, device: torch.device | None = None) -> RecordedSignal:
        """The teacher signal of a batch (``block_index`` and ``block_split`` columns) for its real tokens ``mask``."""
        if "block_index" not in inputs or "block_split" not in inputs:
            raise CacheError(
                "A batch reached the recorded teacher without its block_index/block_split columns. Prepare the data "
                "with distily.data.prepare_datasets(..., block_index=True) and keep the columns "
                "(remove_unused_columns=False; DistillationTrainer sets it with a teacher cache)."
            )
        splits = inputs["block_split"].tolist()
        if len(set(splits)) != 1:
            raise CacheError("A batch mixes train and eval blocks; the recorded teacher serves one split per batch.")
        split = {v: k for k, v in SPLIT_IDS.items()}[splits[0]]
        rows = self.rows_for(split, inputs["block_index"].tolist())
        data = self.read_rows(split, rows)
        input_ids = inputs["input_ids"]
        if input_ids.shape[1] != self.seq_len:
            raise CacheError(f"A batch has blocks of {input_ids.shape[1]} tokens; the cache recorded {self.seq_len}.")
        for position, (block, recorded) in enumerate(zip(input_ids, data["input_hash"].tolist(), strict=True)):
            if block_hash(block) != recorded:
                raise CacheError(
                    f"The {split} block {int(inputs['block_index'][position])} of this batch is not the block the "
                    f"teacher cache {str(self.path)!r} recorded under that index (its tokens differ): the data, "
                    "tokenizer or packing changed since recording. Record this data again."
                )
        return recorded_signal(data, mask, device if device is not None else input_ids.device)

    def close(self) -> None:
        self._slice_cache.clear()
        self._handles.clear()
