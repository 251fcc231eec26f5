"""Recording a teacher into a cache folder: its top-k next-token distribution over the packed blocks, resumable.

``distily record`` runs the teacher over the packed training (and eval) blocks, exactly as training packs them,
and stores per token the ``k`` most likely token ids, their log-probabilities and the log of the remaining
probability mass (the tail), and ``S`` tokens drawn from the tail with their log-probabilities (tail samples:
they make forward KL unbiased, see :mod:`distily.sparse`), in the folder format of
:mod:`distily.teacher.cache.format`.

Two recorders compute a batch's :class:`BlockTopK`: :class:`TransformersRecorder` (a transformers causal LM, CPU or
GPU) and :class:`VllmRecorder` (vLLM's ``prompt_logprobs``). They are not the generation backends of
``distily synth`` (:mod:`distily.teacher.backends`).

Shards are written atomically (temporary file, then rename) and the manifest after each one, so a recording
killed at any point is finished by running the same command again.
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

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoConfig

from ...chunked import hidden_state_path_problem, teacher_hidden_states
from ...config import ConfigError, DataArguments, TeacherArguments, parse_json_dict
from ...data import prepare_datasets, tokenizer_fingerprint
from ...errors import CacheError
from ...io import atomic_path, provenance, write_json_atomic
from ..loading import load_teacher, load_tokenizer, resolve_teacher_path
from .format import (
    LOGPROB_DTYPES,
    MANIFEST,
    SPLIT_IDS,
    TEACHER_CONFIG_DIR,
    TOKENIZER_DIR,
    TeacherCache,
    block_hash,
    bytes_per_token,
    index_name,
    new_manifest,
    sha256_file,
    shard_name,
    write_index,
    write_shard,
)

logger = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm")  # the recorders, by their --backend name
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
# What a recorder returns for a batch of blocks


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


class TransformersRecorder:
    """Records with a ``transformers`` causal LM (CPU or GPU), in inference mode, one batch of blocks at a time.

    When the teacher's logits are its head applied to its final hidden states, the head runs one block at a
    time, so the full-vocabulary logits of a whole batch never exist at once.
    """

    def __init__(
        self, teacher, top_k: int, temperature: float, device: torch.device, tail_samples: int = 0, seed: int = 0
    ):
        self.teacher, self.top_k, self.temperature, self.device = teacher, top_k, temperature, device
        self.tail_samples, self.seed = tail_samples, seed
        self.by_head = hidden_state_path_problem(teacher, teacher=True) is None

    def _top_k(self, logits: Tensor, block: Tensor) -> tuple[Tensor, ...]:
        # Seeded by the block's tokens: the same block draws the same samples in any batch, and after a resume.
        seed = (block_hash(block) + self.seed) % 2**63
        return top_k_of_logits(logits, block[1:], self.top_k, self.temperature, self.tail_samples, seed)

    def __call__(self, input_ids: Tensor) -> BlockTopK:
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


class VllmRecorder:
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
# The teacher's identity


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


# ----------------------------------------------------------------------------------------------------------------
# Recording


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
    return new_manifest(identity, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


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
    if not config.output:
        raise ConfigError("--output is required: the folder to write the teacher cache into.")
    if not teacher_args.teacher and teacher is None:
        raise ConfigError("--teacher is required: the model whose distribution is recorded.")
    if teacher_args.teachers and len(teacher_args.teachers) > 1:
        raise ConfigError(
            "distily record records one teacher per cache: run it once per --teacher (each with its own --output), "
            "then train from all of them with --teacher_cache CACHE_A,CACHE_B (docs/teachers.md)."
        )
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
            backend = VllmRecorder(engine_params[0], config.top_k, engine_params[1])
        else:
            backend = TransformersRecorder(
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
        index_path = output / index_name(split)
        if not index_path.is_file():
            write_index(index_path, dataset["block_index"])
        entry["index_sha256"] = sha256_file(index_path)
        count = math.ceil(len(dataset) / config.rows_per_shard)
        shards = entry.setdefault("shards", [None] * count)
        for shard in range(count):
            start, stop = shard * config.rows_per_shard, min((shard + 1) * config.rows_per_shard, len(dataset))
            path = output / shard_name(split, shard)
            if path.is_file():  # written atomically: present means complete (killed before the manifest update?)
                if shards[shard] is None:
                    shards[shard] = {
                        "file": shard_name(split, shard),
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
            write_shard(path, shard_rows, settings)
            shards[shard] = {"file": shard_name(split, shard), "rows": stop - start, "sha256": sha256_file(path)}
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


# The names these recorders had before ``distily synth`` got generation backends of the same names.
TransformersBackend = TransformersRecorder
VllmBackend = VllmRecorder
