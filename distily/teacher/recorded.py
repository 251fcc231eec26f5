"""A recorded teacher: its top-k next-token distribution, computed once per dataset and trained from many times.

``distily record`` runs the teacher over the packed training (and eval) blocks, exactly as training packs
them, and stores per token the ``k`` most likely token ids, their log-probabilities and the log of the
remaining probability mass (the tail), and ``S`` tokens drawn from the tail with their log-probabilities (tail
samples: they make forward KL unbiased, see :mod:`distily.sparse`). ``distily --teacher_cache DIR`` then
trains without the teacher: the losses are computed on the top-k tokens plus one tail bucket.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..chunked import SparseTeacherSignal
from ..config import ConfigError, DataArguments, TeacherArguments, parse_json_dict
from ..data import BLOCK_SPLITS
from ..errors import CacheError
from ..io import atomic_path, provenance, write_json_atomic
from ..sparse import SparseTeacher

logger = logging.getLogger(__name__)

CACHE_FORMAT = "distily-teacher-cache"
CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TEACHER_CONFIG_DIR = "teacher_config"
# Split names and the ids the ``block_split`` column uses for them.
SPLIT_IDS = BLOCK_SPLITS
BACKENDS = ("transformers", "vllm")
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# log τ is stored no lower than this: a tail of e^-100 is zero for every loss, and -inf would make reverse KL infinite.
TAIL_LOGPROB_FLOOR = -100.0
# Tail samples per position by default (transformers backend): within 1% of full-logit KD in
# benchmarks/RESULTS.md, where the bucket alone was 5% off; 32 bytes per token.
DEFAULT_TAIL_SAMPLES = 8


@dataclass
class RecordConfig:
    """``distily record``: where and how to record the teacher's top-k distribution."""

    output: str | None = field(default=None, metadata={"help": "Cache folder to write (required)."})
    top_k: int = field(default=64, metadata={"help": "Token ids and log-probabilities kept per position."})
    tail_samples: int | None = field(
        default=None,
        metadata={
            "help": "Tokens drawn per position from the teacher's distribution outside the top k, kept with their "
            "log-probabilities: they make forward KL's gradient unbiased (4 bytes each). Default 8 with the "
            "transformers backend; 0 with vllm, whose prompt_logprobs give only the top k."
        },
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per packed block: the training run's --seq_len."})
    backend: str = field(
        default="transformers",
        metadata={
            "help": "transformers (CPU or GPU, batched, no gradients) or vllm (prompt_logprobs on a GPU; needs "
            "pip install 'distily[gpu]').",
            "choices": list(BACKENDS),
        },
    )
    logprob_dtype: str = field(
        default="float16",
        metadata={
            "help": "Storage type of the log-probabilities: float16 or bfloat16.",
            "choices": list(LOGPROB_DTYPES),
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Record softmax(logits / T): training must use the same --temperature."}
    )
    batch_size: int = field(default=4, metadata={"help": "Blocks per teacher forward pass."})
    rows_per_shard: int = field(default=256, metadata={"help": "Blocks per shard file (the unit of resuming)."})
    device: str | None = field(
        default=None, metadata={"help": "Device of the transformers backend (default: cuda if available, else cpu)."}
    )
    seed: int = field(
        default=42, metadata={"help": "Seed of the --max_train_blocks selection: the training run's --seed."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a different recording found in --output."})
    vllm_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "JSON object of extra vllm.LLM arguments, e.g. '{\"gpu_memory_utilization\": 0.8}'."},
    )

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}.")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ConfigError(f"--logprob_dtype {self.logprob_dtype!r} is not one of {', '.join(LOGPROB_DTYPES)}.")
        for name in ("top_k", "batch_size", "rows_per_shard"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} must be a whole number ≥ 1, got {value!r}.")
        if self.tail_samples is None:
            self.tail_samples = 0 if self.backend == "vllm" else DEFAULT_TAIL_SAMPLES
        if isinstance(self.tail_samples, bool) or not isinstance(self.tail_samples, int) or self.tail_samples < 0:
            raise ConfigError(f"--tail_samples must be a whole number ≥ 0, got {self.tail_samples!r}.")
        if self.backend == "vllm" and self.tail_samples:
            raise ConfigError(
                "--backend vllm cannot draw tail samples: vLLM's prompt_logprobs return only the top-k tokens, not "
                "the rest of the distribution. Record with --tail_samples 0 (forward KL then uses the tail bucket "
                "only), or use --backend transformers."
            )
        if self.seq_len < 2:
            raise ConfigError(f"--seq_len must be at least 2 (a block needs a next token), got {self.seq_len}.")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"--temperature must be a number > 0, got {self.temperature}.")
        if self.backend == "vllm" and self.temperature != 1.0:
            raise ConfigError(
                "--backend vllm records vLLM's prompt_logprobs, which are computed at temperature 1. Record with "
                "--temperature 1 (and train with it), or use --backend transformers."
            )
        self.vllm_kwargs = parse_json_dict(self.vllm_kwargs, "vllm_kwargs", '{"gpu_memory_utilization": 0.8}')


# ----------------------------------------------------------------------------------------------------------------
# What a backend returns for a batch of blocks


@dataclass
class BlockTopK:
    """The teacher's top-k distribution for ``B`` blocks of ``L`` tokens (positions ``0..L-2``)."""

    ids: Tensor  # (B, L-1, k) int64
    logprobs: Tensor  # (B, L-1, k) float32, descending
    tail_logprob: Tensor  # (B, L-1) float32
    nll: Tensor  # (B,) float64: Σ over positions of −log p(next token) at temperature 1
    sample_ids: Tensor | None = None  # (B, L-1, S) int64: drawn from the tail, with replacement
    sample_logprobs: Tensor | None = None  # (B, L-1, S) float32: their log p (not renormalised to the tail)


def sample_tail(log_probs_outside: Tensor, tail: Tensor, samples: int, generator: torch.Generator) -> Tensor:
    """``samples`` token ids per row ``(P, S)`` drawn with replacement from ``p_j / τ`` over the tokens outside
    the top k (``log_probs_outside`` is ``log p`` with the top k set to −inf). A row whose tail underflows to zero
    draws uniformly outside the top k: its samples weigh ``τ ≈ 0`` in the loss anyway."""
    weights = (log_probs_outside - tail.unsqueeze(-1)).exp_()
    empty = ~(weights.sum(-1) > 0)  # also catches NaN
    if empty.any():
        weights[empty] = torch.isfinite(log_probs_outside[empty]).to(weights.dtype)
    return torch.multinomial(weights, samples, replacement=True, generator=generator)


def top_k_of_logits(
    logits: Tensor, targets: Tensor, top_k: int, temperature: float, tail_samples: int = 0, seed: int = 0
) -> tuple[Tensor, ...]:
    """``(ids, logprobs, tail_logprob, nll, sample_ids, sample_logprobs)`` of one block's logits ``(P, V)`` and
    next tokens ``(P,)``; the samples are ``None`` when ``tail_samples`` is 0.

    The tail is a log-sum-exp over the tokens outside the top k (exact, no ``1 − Σ p`` cancellation); the NLL
    is at temperature 1 whatever the recording temperature. Samples are drawn with a generator seeded by
    ``seed`` (the recording seeds it from the block's tokens, so a resumed recording draws the same ones).
    """
    logits = logits.float()
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double()
    log_probs = (logits / temperature if temperature != 1.0 else logits).log_softmax(-1)
    values, ids = log_probs.topk(top_k, dim=-1)
    outside = log_probs.scatter_(-1, ids, float("-inf"))
    tail = outside.logsumexp(-1).clamp_(min=TAIL_LOGPROB_FLOOR)
    if not tail_samples:
        return ids, values, tail, nll, None, None
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    sample_ids = sample_tail(outside, tail, tail_samples, generator)
    return ids, values, tail, nll, sample_ids, outside.gather(-1, sample_ids)


class TransformersBackend:
    """Records with a ``transformers`` causal LM (CPU or GPU), in inference mode, one batch of blocks at a time.

    When the teacher's logits are its head applied to its final hidden states, the head runs one block at a
    time, so the full-vocabulary logits of a whole batch never exist at once.
    """

    def __init__(
        self, teacher, top_k: int, temperature: float, device: torch.device, tail_samples: int = 0, seed: int = 0
    ):
        from ..chunked import hidden_state_path_problem

        self.teacher, self.top_k, self.temperature, self.device = teacher, top_k, temperature, device
        self.tail_samples, self.seed = tail_samples, seed
        self.by_head = hidden_state_path_problem(teacher, teacher=True) is None

    def _top_k(self, logits: Tensor, block: Tensor) -> tuple[Tensor, ...]:
        # Seeded by the block's tokens: the same block draws the same samples in any batch, and after a resume.
        seed = (block_hash(block) + self.seed) % 2**63
        return top_k_of_logits(logits, block[1:], self.top_k, self.temperature, self.tail_samples, seed)

    def __call__(self, input_ids: Tensor) -> BlockTopK:
        from ..chunked import teacher_hidden_states

        ids = input_ids.to(self.device)
        results = []
        with torch.inference_mode():
            if self.by_head:
                hidden = teacher_hidden_states(self.teacher, ids, None)
                head = self.teacher.get_output_embeddings()
                for row in range(ids.shape[0]):
                    results.append(self._top_k(head(hidden[row, :-1]), ids[row]))
            else:
                all_logits = self.teacher(input_ids=ids, use_cache=False).logits
                for row in range(ids.shape[0]):
                    results.append(self._top_k(all_logits[row, :-1], ids[row]))
        return BlockTopK(*(None if part[0] is None else torch.stack(part).cpu() for part in zip(*results, strict=True)))


class VllmBackend:
    """Records with vLLM's ``prompt_logprobs`` (one forward pass per block on a GPU, no generation).

    vLLM returns, per prompt, a list with ``None`` for the first token and then, for each position ``j``, a
    dict ``{token_id: Logprob(logprob, rank, decoded_token)}`` holding the top-k tokens of the distribution that
    predicts token ``j`` (plus the actual token ``j`` when it is not among them). Position ``j`` of a block
    here predicts token ``j + 1``, so it is ``prompt_logprobs[j + 1]``. vLLM gives no tail mass: it is
    ``1 − Σ top-k`` computed in float64 from vLLM's float32 log-probabilities (accurate to about 1e-6).
    """

    def __init__(self, engine, top_k: int, sampling_params=None):
        self.engine, self.top_k = engine, top_k
        self.sampling_params = sampling_params

    def __call__(self, input_ids: Tensor) -> BlockTopK:
        rows = input_ids.tolist()
        prompts = [{"prompt_token_ids": row} for row in rows]
        outputs = self.engine.generate(prompts, self.sampling_params, use_tqdm=False)
        k, length = self.top_k, input_ids.shape[1]
        ids = torch.zeros(len(rows), length - 1, k, dtype=torch.int64)
        values = torch.zeros(len(rows), length - 1, k, dtype=torch.float64)
        nll = torch.zeros(len(rows), dtype=torch.float64)
        for b, (output, row) in enumerate(zip(outputs, rows, strict=True)):
            positions = output.prompt_logprobs
            if positions is None or len(positions) != length:
                raise RuntimeError(
                    f"vLLM returned {None if positions is None else len(positions)} prompt_logprobs for a block of "
                    f"{length} tokens; it must be asked for prompt_logprobs={k} (SamplingParams)."
                )
            for j in range(length - 1):
                entries = positions[j + 1]
                ranked = sorted(entries.items(), key=lambda item: -item[1].logprob)[:k]
                if len(ranked) < k:
                    raise RuntimeError(
                        f"vLLM returned {len(ranked)} log-probabilities at a position, fewer than k={k}."
                    )
                ids[b, j] = torch.tensor([token for token, _ in ranked])
                values[b, j] = torch.tensor([entry.logprob for _, entry in ranked], dtype=torch.float64)
                nll[b] -= entries[row[j + 1]].logprob
        tail_mass = (1.0 - values.exp().sum(-1)).clamp(min=math.exp(TAIL_LOGPROB_FLOOR))
        return BlockTopK(ids, values.float(), tail_mass.log().float(), nll)


def vllm_engine(teacher_args: TeacherArguments, config: RecordConfig):
    """A ``vllm.LLM`` for the teacher and the ``SamplingParams`` that ask for the prompt's top-k log-probabilities."""
    try:
        import vllm
    except ImportError as err:
        raise ConfigError(
            "--backend vllm needs vLLM, which is not installed: pip install 'distily[gpu]' (a CUDA GPU is "
            "required), or record with --backend transformers."
        ) from err
    from .loading import resolve_teacher_path

    folder, gguf_file = resolve_teacher_path(teacher_args.teacher)
    model = str(Path(folder) / gguf_file) if gguf_file else folder
    dtype = "auto" if teacher_args.teacher_dtype == "auto" else teacher_args.teacher_dtype
    engine = vllm.LLM(
        model=model,
        tokenizer=folder,
        dtype=dtype,
        revision=teacher_args.teacher_revision,
        trust_remote_code=teacher_args.trust_remote_code,
        max_logprobs=config.top_k + 1,
        max_model_len=config.seq_len,
        seed=0,
        **(config.vllm_kwargs or {}),
    )
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=config.top_k, temperature=1.0, detokenize=False)
    return engine, params


# ----------------------------------------------------------------------------------------------------------------
# Hashes


def sha256_file(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, dtypes, bytes), one tensor at a time."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weight_files_sha256(name_or_path: str) -> str | None:
    """sha256 over a local teacher's weight files (vLLM loads them itself); None for a Hub id."""
    from .loading import resolve_teacher_path

    folder, gguf_file = resolve_teacher_path(name_or_path)
    files = [Path(folder) / gguf_file] if gguf_file else sorted(Path(folder).glob("*.safetensors"))
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def block_hash(input_ids: Tensor) -> int:
    """A 63-bit hash of one block's token ids: recorded with each row, compared with every training batch."""
    data = input_ids.detach().to("cpu", torch.int32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------------------------------------------
# Recording


# What training reads per row.
ROW_TENSORS = ("top_ids", "top_logprobs", "tail_logprob", "input_hash", "teacher_nll")
SAMPLE_TENSORS = ("tail_sample_ids", "tail_sample_logprobs")  # in caches recorded with tail samples
SETTING_KEYS = (
    "seq_len", "top_k", "tail_samples", "temperature", "logprob_dtype", "id_dtype", "rows_per_shard", "vocab_size"
)  # fmt: skip


def _settings(config: RecordConfig, vocab_size: int) -> dict[str, Any]:
    id_dtype = "uint16" if vocab_size <= 2**16 else "int32"
    return {
        "seq_len": config.seq_len,
        "top_k": config.top_k,
        "tail_samples": config.tail_samples,
        "temperature": config.temperature,
        "logprob_dtype": config.logprob_dtype,
        "id_dtype": id_dtype,
        "rows_per_shard": config.rows_per_shard,
        "vocab_size": vocab_size,
    }


def _shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.safetensors"


def bytes_per_token(settings: dict[str, Any]) -> float:
    """Stored bytes per token of a cache with these settings (ids, log-probabilities, tail, tail samples; per-row
    extras)."""
    k, length, samples = settings["top_k"], settings["seq_len"], settings.get("tail_samples", 0)
    id_bytes = 2 if settings["id_dtype"] == "uint16" else 4
    per_position = (k + samples) * (id_bytes + 2) + 2
    per_row = 8 + 8 + 4  # block_index, input_hash, teacher_nll
    return (per_position * (length - 1) + per_row) / length


def _write_shard(path: Path, rows: dict[str, Tensor], settings: dict[str, Any]) -> None:
    from safetensors.torch import save_file

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


def _load_or_start_manifest(output: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue (same identity) or a fresh one; a different recording in ``output`` is refused."""
    path = output / MANIFEST
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("identity") == identity:
            return previous
        if not overwrite:
            differences = [
                f"{key}: {previous.get('identity', {}).get(key)!r} there, {value!r} now"
                for key, value in identity.items()
                if previous.get("identity", {}).get(key) != value
            ]
            raise CacheError(
                f"{str(output)!r} holds a recording of something else ({'; '.join(differences)}). Choose another "
                "--output, or pass --overwrite to replace it."
            )
        logger.warning("Replacing the recording in %s (--overwrite).", output)
        for name in (MANIFEST, TOKENIZER_DIR, TEACHER_CONFIG_DIR, *SPLIT_IDS):
            target = output / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif output.exists() and any(output.iterdir()) and not overwrite:
        raise CacheError(f"--output {str(output)!r} is not empty and holds no teacher cache. Choose another folder.")
    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "status": "recording",
        "identity": identity,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "splits": {},
    }


def record(
    teacher_args: TeacherArguments,
    data_args: DataArguments,
    config: RecordConfig,
    *,
    teacher=None,
    tokenizer=None,
    backend: Callable[[Tensor], BlockTopK] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> Path:
    """Record the teacher's top-k distribution over the packed train and eval blocks into ``config.output``.

    ``teacher``/``tokenizer`` skip loading (tests, notebooks); ``backend`` replaces the model call (a fake vLLM
    engine in tests). Resumable: finished shards of the same recording are kept. ``stop_after_shards`` writes
    that many new shards and returns (what an interrupted run leaves behind; for tests). Returns the folder.
    """
    from tqdm.auto import tqdm

    from ..data import prepare_datasets, tokenizer_fingerprint
    from .loading import load_teacher, load_tokenizer

    if not config.output:
        raise ConfigError("--output is required: the folder to write the teacher cache into.")
    if not teacher_args.teacher and teacher is None:
        raise ConfigError("--teacher is required: the model whose distribution is recorded.")
    output = Path(config.output)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    engine_params = None
    if config.backend == "vllm" and backend is None:
        engine_params = vllm_engine(teacher_args, config)  # fails early, with the install hint, without vLLM
    if tokenizer is None:
        tokenizer = load_tokenizer(teacher_args.teacher, teacher_args.teacher_revision, teacher_args.trust_remote_code)
    if config.backend == "transformers" and teacher is None and backend is None:
        teacher, _ = load_teacher(
            teacher_args.teacher,
            dtype=teacher_args.teacher_dtype,
            device=device,
            revision=teacher_args.teacher_revision,
            trust_remote_code=teacher_args.trust_remote_code,
            quantization_bits=teacher_args.teacher_quantization_bits,
        )
    if teacher is not None:
        teacher_config = teacher.config
        weights = weights_sha256(teacher)
    else:
        from transformers import AutoConfig

        from .loading import resolve_teacher_path

        folder, gguf_file = resolve_teacher_path(teacher_args.teacher)
        teacher_config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
        weights = weight_files_sha256(teacher_args.teacher)
    vocab_size = int(teacher_config.vocab_size)
    if config.top_k >= vocab_size:
        raise ConfigError(f"--top_k {config.top_k} must be smaller than the vocabulary ({vocab_size} tokens).")

    data = prepare_datasets(data_args, tokenizer, config.seq_len, seed=config.seed, block_index=True)
    settings = _settings(config, vocab_size)
    identity = {
        "teacher": teacher_args.teacher,
        "teacher_weights_sha256": weights,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "backend": config.backend,
        **settings,
        "splits": {split: data.source_fingerprints[split] for split in SPLIT_IDS},
        "selection": {
            "max_train_blocks": data_args.max_train_blocks,
            "max_eval_blocks": data_args.max_eval_blocks,
            "seed": config.seed,
        },
    }
    manifest = _load_or_start_manifest(output, identity, overwrite or config.overwrite)
    if manifest.get("status") == "complete":
        logger.info("%s already holds this recording, complete: nothing to do.", output)
        return output
    output.mkdir(parents=True, exist_ok=True)
    manifest.update(provenance(), data=vars(data_args).copy())
    write_json_atomic(output / MANIFEST, manifest)  # first, so an interrupted recording is recognised and resumed
    if not (output / TOKENIZER_DIR).is_dir():
        with atomic_path(output / TOKENIZER_DIR) as tmp:
            tokenizer.save_pretrained(tmp)
    if not (output / TEACHER_CONFIG_DIR).is_dir():
        with atomic_path(output / TEACHER_CONFIG_DIR) as tmp:
            teacher_config.save_pretrained(tmp)

    if backend is None:
        if config.backend == "vllm":
            backend = VllmBackend(engine_params[0], config.top_k, engine_params[1])
        else:
            backend = TransformersBackend(
                teacher, config.top_k, config.temperature, device, config.tail_samples, config.seed
            )

    datasets_by_split = {"train": data.train, "eval": data.eval}
    total_tokens = sum(len(ds) for ds in datasets_by_split.values()) * config.seq_len
    new_shards = 0
    started, recorded_tokens = time.perf_counter(), 0
    bar = tqdm(total=total_tokens, unit="tok", desc="Recording teacher", disable=not progress)
    for split, dataset in datasets_by_split.items():
        entry = manifest["splits"].setdefault(split, {})
        entry.update(blocks=len(dataset), fingerprint=data.source_fingerprints[split])
        index_path = output / split / "index.safetensors"
        if not index_path.is_file():
            from safetensors.torch import save_file

            with atomic_path(index_path) as tmp:
                save_file({"block_index": torch.tensor(dataset["block_index"], dtype=torch.int64)}, str(tmp))
        entry["index_sha256"] = sha256_file(index_path)
        count = math.ceil(len(dataset) / config.rows_per_shard)
        shards = entry.setdefault("shards", [None] * count)
        for shard in range(count):
            start, stop = shard * config.rows_per_shard, min((shard + 1) * config.rows_per_shard, len(dataset))
            path = output / _shard_name(split, shard)
            if path.is_file():  # written atomically: present means complete (killed before the manifest update?)
                if shards[shard] is None:
                    shards[shard] = {
                        "file": _shard_name(split, shard),
                        "rows": stop - start,
                        "sha256": sha256_file(path),
                    }
                    manifest["splits"][split] = entry
                    write_json_atomic(output / MANIFEST, manifest)
                bar.update((stop - start) * config.seq_len)
                continue
            if stop_after_shards is not None and new_shards >= stop_after_shards:
                bar.close()
                return output
            rows = dataset.select(range(start, stop))
            parts: dict[str, list[Tensor]] = {part.name: [] for part in fields(BlockTopK)}
            for batch_start in range(0, len(rows), config.batch_size):
                ids = torch.tensor(rows[batch_start : batch_start + config.batch_size]["input_ids"], dtype=torch.long)
                result = backend(ids)
                if (result.sample_ids is not None) != bool(config.tail_samples):
                    raise CacheError(
                        f"The recording backend returned {'no ' if result.sample_ids is None else ''}tail samples, "
                        f"but --tail_samples is {config.tail_samples}. A backend must return sample_ids and "
                        "sample_logprobs exactly when tail samples are asked for; record with a matching "
                        "--tail_samples."
                    )
                for name, parts_of_field in parts.items():
                    if getattr(result, name) is not None:
                        parts_of_field.append(getattr(result, name))
                bar.update(ids.numel())
                recorded_tokens += ids.numel()
            blocks = torch.tensor(rows["input_ids"], dtype=torch.long)
            shard_rows = {key: torch.cat(value) for key, value in parts.items() if value}
            shard_rows["block_index"] = torch.tensor(rows["block_index"], dtype=torch.int64)
            shard_rows["input_hash"] = torch.tensor([block_hash(block) for block in blocks], dtype=torch.int64)
            _write_shard(path, shard_rows, settings)
            shards[shard] = {"file": _shard_name(split, shard), "rows": stop - start, "sha256": sha256_file(path)}
            manifest["splits"][split] = entry
            write_json_atomic(output / MANIFEST, manifest)
            new_shards += 1
    bar.close()
    seconds = time.perf_counter() - started
    # Teacher perplexity per split, from the recorded full-logit NLL of every shard.
    cache = TeacherCache(output, allow_incomplete=True)
    for split in SPLIT_IDS:
        entry = manifest["splits"][split]
        nll = cache.total_nll(split)
        positions = entry["blocks"] * (config.seq_len - 1)
        entry["teacher_ppl"] = math.exp(min(nll / max(positions, 1), 700.0))
    manifest.update(
        status="complete",
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        bytes_per_token=round(bytes_per_token(settings), 2),
        stored_bytes=sum(p.stat().st_size for p in output.glob("*/shard-*.safetensors")),
        tokens_recorded_this_run=recorded_tokens,
        tokens_per_second_this_run=round(recorded_tokens / seconds, 1) if recorded_tokens else None,
    )
    write_json_atomic(output / MANIFEST, manifest)
    train, evaluation = manifest["splits"]["train"], manifest["splits"]["eval"]
    logger.info(
        "Recorded %s: %d train + %d eval blocks, %.1f bytes/token, teacher ppl train %.2f eval %.2f.",
        output, train["blocks"], evaluation["blocks"], manifest["bytes_per_token"], train["teacher_ppl"],
        evaluation["teacher_ppl"],
    )  # fmt: skip
    return output


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
        from ..data import tokenizer_fingerprint
        from ..sparse import check_bucket_loss

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
            from safetensors import safe_open

            self._verify(split, shard)
            self._handles[key] = safe_open(str(self.path / _shard_name(split, shard)), framework="pt")
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
            from safetensors.torch import load_file

            index_path = self.path / split / "index.safetensors"
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
        device = device if device is not None else input_ids.device
        mask_cpu = mask.to("cpu")
        counts = mask_cpu.sum(-1).clamp(min=1).to(torch.float64)
        per_token_nll = (data["teacher_nll"].double() / counts)[:, None].expand_as(mask_cpu)[mask_cpu]
        samples = {}
        if self.tail_samples:
            samples = {
                "sample_ids": data["tail_sample_ids"][mask_cpu].to(device),
                "sample_logprobs": data["tail_sample_logprobs"][mask_cpu].to(device),
            }
        return RecordedSignal(
            SparseTeacher(
                ids=data["top_ids"][mask_cpu].to(device),
                logprobs=data["top_logprobs"][mask_cpu].to(device),
                tail_logprob=data["tail_logprob"][mask_cpu].to(device),
                **samples,
            ),
            per_token_nll.float().to(device),
        )

    def close(self) -> None:
        self._slice_cache.clear()
        self._handles.clear()


class RecordedSignal(SparseTeacherSignal):
    """The recorded teacher for one batch's selected tokens.

    ``teacher_nll`` spreads each block's recorded NLL evenly over its selected tokens: sums per sequence (what
    evaluation adds up) are the recorded, full-logit values; single tokens are not.
    """

    def __init__(self, teacher: SparseTeacher, nll: Tensor):
        self.teacher, self.nll = teacher, nll

    def top_k(self, rows: slice) -> SparseTeacher:
        return self.teacher[rows]

    def teacher_nll(self, rows: slice) -> Tensor:
        return self.nll[rows]
