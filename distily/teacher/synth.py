"""``distily synth``: write a dataset of teacher samples, resumably and exactly once per prompt.

Pipeline: prompts (a file, a dataset, or seed topics the teacher expands) -> a task template turns each prompt
into a request -> a backend (local transformers, vLLM, or an OpenAI-compatible API) answers -> samples are
written in immutable JSONL shards, atomically, with a manifest (teacher, sampling, template, counts, token
usage). The folder trains directly: ``distily --dataset FOLDER`` (see :mod:`distily.teacher.synth_dataset`).

Exactly once: every prompt has a stable id (a hash of its text) and every sample ``{prompt_id}-{k}``. Before
generating, the runner reads the shards already written and skips their ids; a run killed at any point loses
at most the samples not yet flushed to a shard, which the next run generates. Nothing is written twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import shlex
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import ConfigError, TeacherArguments, config_to_dict, parse_json_dict
from ..data.synth_format import (
    CONFIG,
    MANIFEST,
    PROMPTS,
    REJECTED_PREFIX,
    SAMPLES_PREFIX,
    read_jsonl,
    shard_files,
)
from ..io import atomic_path, provenance, write_json_atomic, write_yaml_atomic
from .backends import (
    Backend,
    Generation,
    GenerationRequest,
    OpenAIBackend,
    RetryPolicy,
    SynthError,
    TransformersBackend,
    VLLMBackend,
    redact,
    strip_credentials,
)
from .templates import TaskTemplate, load_template

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "transformers", "vllm", "openai")
SCHEDULES = ("constant", "linear", "cosine", "exponential")
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class SynthArguments:
    """Flags of ``distily synth`` (the teacher itself is :class:`distily.TeacherArguments`)."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Folder for the samples, prompts and manifest (required; resumable)."}
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "transformers (local, CPU or GPU), vllm (GPU), openai (any OpenAI-compatible API), or auto: "
            "openai when --api_model is set, else transformers.",
            "choices": list(BACKENDS),
        },
    )
    template: str = field(
        default="qa",
        metadata={"help": "Task template: continuation, qa, code, a registered name, or a .yaml template file."},
    )
    template_kwargs: dict | str | None = field(
        default=None, metadata={"help": 'JSON object of template parameters, e.g. \'{"language": "Go"}\'.'}
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompt source: a .txt file (one prompt per line), a .jsonl/.json file (--prompt_field), or a "
            "dataset (python-stdlib, a folder, a Hub dataset; its train split only, so eval text never leaks)."
        },
    )
    prompt_field: str | None = field(
        default=None, metadata={"help": "Field holding the prompt (default: 'prompt' in files, 'text' in datasets)."}
    )
    seed_topics: str | None = field(
        default=None,
        metadata={"help": "Comma-separated topics, or a .txt file of one topic per line, that the teacher expands."},
    )
    prompts_per_topic: int = field(default=10, metadata={"help": "Prompts the teacher writes for each seed topic."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use at most this many prompts (in order)."})
    prompt_max_chars: int = field(
        default=2000, metadata={"help": "Cut longer prompts (at a line break when possible) to this many characters."}
    )
    samples_per_prompt: int = field(default=1, metadata={"help": "Samples generated for each prompt."})
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens the teacher writes per sample."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0 is greedy)."})
    temperature_end: float | None = field(
        default=None, metadata={"help": "Temperature of the last sample under a temperature schedule."}
    )
    temperature_schedule: str = field(
        default="constant",
        metadata={
            "help": "How the temperature moves from --temperature to --temperature_end across the planned samples: "
            "constant, linear, cosine or exponential.",
            "choices": list(SCHEDULES),
        },
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling probability in (0, 1]."})
    seed: int = field(default=0, metadata={"help": "Seed of every sample's sampling seed."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per batch for local backends (vllm: per chunk)."})
    device: str | None = field(
        default=None, metadata={"help": "Device of the transformers backend (default: the accelerator, else CPU)."}
    )
    api_base: str | None = field(
        default=None, metadata={"help": "Base URL of the OpenAI-compatible API (default: the client's)."}
    )
    api_model: str | None = field(default=None, metadata={"help": "Model name sent to the API, e.g. gpt-4o."})
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={"help": "NAME of the environment variable holding the API key (the key is never written)."},
    )
    concurrency: int = field(default=8, metadata={"help": "API requests in flight at once."})
    request_timeout: float = field(default=60.0, metadata={"help": "Seconds before an API request times out."})
    max_retries: int = field(default=6, metadata={"help": "Retries of an API request on 429, 5xx and timeouts."})
    backoff_base: float = field(default=1.0, metadata={"help": "First retry wait in seconds (doubles each retry)."})
    backoff_max: float = field(default=60.0, metadata={"help": "Longest retry wait, Retry-After included."})
    max_total_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Token budget (prompt + completion, over all runs into this folder): no request is started "
            "that could take the total over it."
        },
    )
    dedup: bool = field(default=False, metadata={"help": "Drop samples whose text repeats an earlier sample."})
    shard_size: int = field(default=100, metadata={"help": "Samples per shard file (the unit of atomic writes)."})
    flush_seconds: float = field(
        default=60.0, metadata={"help": "Write a (smaller) shard when the last one is this old, between batches."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a synth folder made with different settings."}
    )

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("--output_dir is required: the folder the samples are written to.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}.")
        self.template_kwargs = parse_json_dict(self.template_kwargs, "template_kwargs", '{"language": "Go"}') or {}
        if not self.prompts and not self.seed_topics:
            raise ConfigError(
                "Give the prompts: --prompts FILE_OR_DATASET (a .txt of one prompt per line, a .jsonl, or a dataset) "
                "or --seed_topics 'topic one, topic two' for the teacher to expand."
            )
        if self.prompts and self.seed_topics:
            raise ConfigError("Pass either --prompts or --seed_topics, not both.")
        positive = ("prompts_per_topic", "prompt_max_chars", "samples_per_prompt", "max_new_tokens", "batch_size")
        for name in (*positive, "concurrency", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_prompts", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1 (or unset), got {value}.")
        if self.max_retries < 0:
            raise ConfigError(f"--max_retries must be 0 or more, got {self.max_retries}.")
        for name in ("request_timeout", "flush_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0 seconds, got {getattr(self, name)}.")
        if not (0 <= self.backoff_base <= self.backoff_max):
            raise ConfigError(f"Need 0 <= --backoff_base <= --backoff_max, got {self.backoff_base}, {self.backoff_max}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}.")
        for name in ("temperature", "temperature_end"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name} must be a finite number >= 0, got {value}.")
        if self.temperature_schedule not in SCHEDULES:
            raise ConfigError(f"--temperature_schedule {self.temperature_schedule!r} is not one of {SCHEDULES}.")
        if self.temperature_schedule != "constant" and self.temperature_end is None:
            raise ConfigError(f"--temperature_schedule {self.temperature_schedule} needs --temperature_end.")
        if self.temperature_schedule == "exponential" and not (self.temperature > 0 and self.temperature_end > 0):
            raise ConfigError("--temperature_schedule exponential needs --temperature and --temperature_end > 0.")
        if self.resolved_backend == "openai" and not self.api_model:
            raise ConfigError("--backend openai needs --api_model (the model name the API serves, e.g. gpt-4o).")
        # Unknown template names, parameters and placeholders fail here, before anything is loaded.
        load_template(self.template).parameters(self.template_kwargs)

    @property
    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "openai" if self.api_model else "transformers"


SYNTH_ARGUMENT_CLASSES = (TeacherArguments, SynthArguments)


def temperature_at(args: SynthArguments, ordinal: int, total: int) -> float:
    """The temperature of planned sample ``ordinal`` of ``total`` under ``args.temperature_schedule``.

    With ``f = ordinal / (total − 1)``: linear ``t0 + (t1 − t0)·f``; cosine ``t1 + (t0 − t1)·(1 + cos πf)/2``;
    exponential ``t0·(t1/t0)^f``. A function of the sample's planned position, so a resumed run gives every
    sample the temperature it would have had.
    """
    start, end = args.temperature, args.temperature_end
    if args.temperature_schedule == "constant" or end is None:
        return start
    fraction = ordinal / (total - 1) if total > 1 else 0.0
    if args.temperature_schedule == "linear":
        value = start + (end - start) * fraction
    elif args.temperature_schedule == "cosine":
        value = end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2
    else:
        value = start * (end / start) ** fraction
    return round(value, 6)


# ----------------------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    source: str


def prompt_id(text: str) -> str:
    """Stable id of a prompt: a hash of its text (the same text is one prompt, wherever it comes from)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cut_prompt(text: str, max_chars: int) -> str:
    text = text.strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    newline = head.rfind("\n")
    return head[:newline] if newline > max_chars // 2 else head


def _unique(prompts: Iterator[Prompt], limit: int | None) -> list[Prompt]:
    seen, kept = set(), []
    for prompt in prompts:
        if prompt.prompt and prompt.id not in seen:
            seen.add(prompt.id)
            kept.append(prompt)
            if limit is not None and len(kept) == limit:
                break
    return kept


def read_prompt_source(args: SynthArguments, cache_dir: str | None = None) -> list[Prompt]:
    """Prompts from ``--prompts``: every line/row of a prompt file, or the train documents of a dataset."""
    import json

    spec = args.prompts
    path = Path(spec).expanduser()

    def make(text: str, source: str) -> Prompt:
        text = cut_prompt(text, args.prompt_max_chars)
        return Prompt(prompt_id(text), text, source)

    if path.suffix in PROMPT_FILE_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"Prompt file {spec!r} does not exist. Check --prompts.")
        field_name = args.prompt_field or "prompt"
        if path.suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = (make(line, f"{path.name}:{n}") for n, line in enumerate(lines, 1) if line.strip())
        else:
            text = path.read_text(encoding="utf-8")
            records = json.loads(text) if path.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ConfigError(f"Prompt file {spec!r} must hold JSON objects (one per line for .jsonl).")
            missing = [n for n, r in enumerate(records, 1) if not isinstance(r.get(field_name), str)]
            if missing:
                raise ConfigError(
                    f"Prompt file {spec!r}: row {missing[0]} has no text field {field_name!r}. Pass --prompt_field."
                )
            rows = (make(r[field_name], f"{path.name}:{n}") for n, r in enumerate(records, 1))
        prompts = _unique(rows, args.max_prompts)
    else:
        from ..config import DataArguments
        from ..data import load_documents

        data_args = DataArguments(
            dataset=spec, dataset_text_field=args.prompt_field or "text", dataset_cache_dir=cache_dir
        )
        train = load_documents(data_args)["train"]  # never the eval split: its text must stay unseen
        has_path = "path" in train.column_names
        rows = (make(row["text"], f"{spec}:{row['path'] if has_path else n}") for n, row in enumerate(train))
        prompts = _unique(rows, args.max_prompts)
    if not prompts:
        raise ConfigError(f"--prompts {spec!r} holds no prompt (every line or row is blank).")
    return prompts


def read_topics(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise ConfigError(f"Seed topic file {spec!r} does not exist. Check --seed_topics.")
        topics = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        topics = [part.strip() for part in spec.split(",")]
    topics = list(dict.fromkeys(t for t in topics if t))
    if not topics:
        raise ConfigError("--seed_topics names no topic.")
    return topics


LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\(?\d+[.):]|[a-z][.)])\s*")


def parse_expansion(text: str, n: int) -> list[str]:
    """The first ``n`` distinct prompt lines of a teacher's list (numbering and bullets stripped; lines shorter
    than 8 characters and preambles ending with a colon skipped)."""
    lines = []
    for line in text.splitlines():
        line = LIST_MARKER.sub("", line).strip().strip('"').strip()
        if len(line) >= 8 and not line.endswith(":") and line not in lines:
            lines.append(line)
    return lines[:n]


def expand_topics(
    args: SynthArguments, template: TaskTemplate, parameters: dict, backend: Backend, budget: TokenBudget
) -> tuple[list[Prompt], dict[str, int]]:
    """Ask the teacher for ``prompts_per_topic`` prompts about each seed topic."""
    topics = read_topics(args.seed_topics)
    requests = [
        GenerationRequest(
            id=f"topic-{index}",
            messages=template.expansion(topic, args.prompts_per_topic, parameters),
            prompt=None,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=min(2048, 40 * args.prompts_per_topic),
            seed=_sample_seed(args.seed, f"topic:{topic}"),
        )
        for index, topic in enumerate(topics)
    ]
    answers: dict[str, Generation] = {}
    usage = Counter()
    for generation in backend.generate(budget.gate(requests, backend)):
        budget.settle(generation)
        usage["prompt_tokens"] += generation.prompt_tokens
        usage["completion_tokens"] += generation.completion_tokens
        answers[generation.id] = generation
    prompts = []
    for index, topic in enumerate(topics):
        answer = answers.get(f"topic-{index}")
        if answer is None or answer.error:
            logger.warning("Seed topic %r gave no prompts (%s).", topic, answer.error if answer else "not asked")
            continue
        lines = parse_expansion(answer.text, args.prompts_per_topic)
        if not lines:
            logger.warning("Seed topic %r: the teacher's answer held no usable prompt line.", topic)
        prompts.extend(Prompt(prompt_id(line), line, f"topic:{topic}") for line in lines)
    prompts = _unique(iter(prompts), args.max_prompts)
    if not prompts:
        raise SynthError("The teacher wrote no usable prompt for any seed topic. Give prompts with --prompts.")
    return prompts, dict(usage)


# ----------------------------------------------------------------------------------------------------------------
# Budget


class TokenBudget:
    """A cap on prompt + completion tokens: a request starts only if the tokens used so far, plus the most the
    in-flight requests may still use (their prompt estimate + ``max_new_tokens``), plus its own, fit."""

    def __init__(self, limit: int | None, used: int = 0):
        self.limit = limit
        self.used = used
        self.reserved: dict[str, int] = {}
        self.exhausted = False

    def gate(self, requests, backend: Backend) -> Iterator[GenerationRequest]:
        for request in requests:
            if self.limit is not None:
                need = backend.estimate_prompt_tokens(request) + request.max_new_tokens
                if self.used + sum(self.reserved.values()) + need > self.limit:
                    self.exhausted = True
                    return
                self.reserved[request.id] = need
            yield request

    def settle(self, generation: Generation) -> None:
        self.reserved.pop(generation.id, None)
        self.used += generation.prompt_tokens + generation.completion_tokens


# ----------------------------------------------------------------------------------------------------------------
# Output folder


@dataclass
class SynthResult:
    """What a synth run left in its folder."""

    output_dir: Path
    status: str
    manifest: dict[str, Any]

    @property
    def counts(self) -> dict[str, Any]:
        return self.manifest["counts"]


def _read_manifest(folder: Path) -> dict | None:
    import json

    path = folder / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _plan(args: SynthArguments, template: TaskTemplate, parameters: dict, teacher: dict) -> dict[str, Any]:
    """Everything that decides what the samples are; a folder can only be resumed with the same plan."""
    return {
        "teacher": {k: teacher.get(k) for k in ("backend", "teacher", "api_model", "api_base")},
        "template": template.to_dict(),
        "template_kwargs": parameters,
        "prompts": args.prompts,
        "prompt_field": args.prompt_field,
        "seed_topics": args.seed_topics,
        "prompts_per_topic": args.prompts_per_topic if args.seed_topics else None,
        "max_prompts": args.max_prompts,
        "prompt_max_chars": args.prompt_max_chars,
        "samples_per_prompt": args.samples_per_prompt,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "temperature_end": args.temperature_end,
        "temperature_schedule": args.temperature_schedule,
        "top_p": args.top_p,
        "seed": args.seed,
        "dedup": args.dedup,
    }


def check_output_dir(folder: Path, plan: dict, overwrite: bool) -> bool:
    """True to resume an existing synth folder with the same plan; errors for anything else unless allowed."""
    if not folder.exists() or not any(folder.iterdir()):
        return False
    manifest = _read_manifest(folder)
    if manifest is None:
        raise ConfigError(
            f"Output folder {str(folder)!r} is not empty and is not a synth folder. Choose another --output_dir "
            "(distily only replaces folders it wrote)."
        )
    if manifest.get("plan") == plan:
        return True
    if overwrite:
        return False
    old = manifest.get("plan") or {}
    changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
    raise ConfigError(
        f"Output folder {str(folder)!r} holds samples made with other settings (changed: {', '.join(changed)}). "
        "Rerun with the same settings to resume it, choose another --output_dir, or pass --overwrite_output_dir "
        "to replace it."
    )


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> str:
    import json

    text = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sample_seed(seed: int, sample_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:8], 16) % (2**31 - 1)


def _dedup_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _redacting_logs(secrets: list[str]) -> Iterator[None]:
    """Every log record passing through the root handlers is redacted while the run lasts."""

    class Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            message = record.getMessage()
            clean = redact(message, secrets)
            if clean != message:
                record.msg, record.args = clean, ()
            return True

    handlers = [h for h in logging.getLogger().handlers] + [h for h in logging.getLogger("distily").handlers]
    redactor = Redact()
    for handler in handlers:
        handler.addFilter(redactor)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(redactor)


def _exception_texts(err: BaseException | None, depth: int = 0) -> Iterator[str]:
    while err is not None and depth < 10:
        yield str(err)
        yield repr(err)
        yield from (str(arg) for arg in err.args)
        err, depth = err.__cause__ or err.__context__, depth + 1


# ----------------------------------------------------------------------------------------------------------------
# The run


def default_device():
    """The accelerator torch sees (CUDA, MPS, XPU, ...), else the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return accelerator.current_accelerator()
    return torch.device("cpu")


def make_backend(args: SynthArguments, teacher_args: TeacherArguments | None) -> Backend:
    """The backend ``args`` asks for; local backends need ``--teacher``."""
    kind = args.resolved_backend
    if kind == "openai":
        return OpenAIBackend(
            api_model=args.api_model,
            api_key_env=args.api_key_env,
            api_base=args.api_base,
            concurrency=args.concurrency,
            request_timeout=args.request_timeout,
            retry=RetryPolicy(args.max_retries, args.backoff_base, args.backoff_max),
        )
    if teacher_args is None or not teacher_args.teacher:
        raise ConfigError(
            f"--backend {kind} needs --teacher (a local model); for an API teacher pass --api_model and --api_base."
        )
    from .loading import load_teacher, load_tokenizer

    if kind == "vllm":
        tokenizer = load_tokenizer(teacher_args.teacher, teacher_args.teacher_revision, teacher_args.trust_remote_code)
        teacher, dtype = teacher_args.teacher, teacher_args.teacher_dtype
        return VLLMBackend.load(teacher, tokenizer, dtype=dtype, seed=args.seed, chunk_size=args.batch_size)
    device = args.device or default_device()
    model, tokenizer = load_teacher(
        teacher_args.teacher,
        dtype=teacher_args.teacher_dtype,
        device=device,
        revision=teacher_args.teacher_revision,
        trust_remote_code=teacher_args.trust_remote_code,
    )
    return TransformersBackend(model, tokenizer, batch_size=args.batch_size, teacher=teacher_args.teacher)


def synthesize(
    args: SynthArguments,
    teacher_args: TeacherArguments | None = None,
    backend: Backend | None = None,
    command: list[str] | None = None,
) -> SynthResult:
    """Generate (or finish generating) the samples ``args`` plans into ``args.output_dir``.

    ``backend`` overrides the one ``args`` describes (e.g. a custom engine in Python). Returns the final manifest;
    ``status`` is ``finished`` when every planned sample is written, ``budget_exhausted`` when the token cap
    stopped it, ``incomplete`` when some requests failed for good (rerun to retry them).
    """
    secrets: list[str] = []
    try:
        # File and dataset prompts are read (and checked) before a model is loaded or anything is written.
        source_prompts = read_prompt_source(args) if args.prompts else None
        backend = backend or make_backend(args, teacher_args)
        secrets = list(getattr(backend, "secrets", []))
        with _redacting_logs(secrets):
            return _run(args, teacher_args, backend, source_prompts, command, secrets)
    except BaseException as err:
        if secrets and any(s in text for s in secrets for text in _exception_texts(err)):
            raise SynthError(redact(f"{type(err).__name__}: {err}", secrets)) from None
        raise


def _run(args, teacher_args, backend: Backend, source_prompts, command, secrets) -> SynthResult:
    template = load_template(args.template)
    parameters = template.parameters(args.template_kwargs)
    teacher_info = backend.describe()
    plan = _plan(args, template, parameters, teacher_info)
    folder = Path(args.output_dir)
    resuming = check_output_dir(folder, plan, args.overwrite_output_dir)
    if not resuming and folder.exists() and args.overwrite_output_dir and _read_manifest(folder) is not None:
        logger.warning("Replacing the synth folder %s (--overwrite_output_dir).", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)

    previous = _read_manifest(folder) if resuming else None
    manifest: dict[str, Any] = {
        **provenance(),
        "kind": "distily-synth",
        "status": "planning",
        "started_at": (previous or {}).get("started_at") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": redact(shlex.join(command), secrets) if command else None,
        "teacher": teacher_info,
        "plan": plan,
        "max_total_tokens": args.max_total_tokens,
        "sessions": list((previous or {}).get("sessions", [])),
        "expansion_usage": (previous or {}).get("expansion_usage", {}),
    }
    write_json_atomic(folder / MANIFEST, manifest)
    config = config_to_dict(*([teacher_args] if teacher_args else []), args)
    if "api_base" in config:
        config["api_base"] = strip_credentials(config["api_base"])
    write_yaml_atomic(folder / CONFIG, config)

    # Written samples: what to skip, the dedup keys, the tokens already spent.
    kept = [row for path in shard_files(folder) for row in read_jsonl(path)]
    rejected = [row for path in shard_files(folder, REJECTED_PREFIX) for row in read_jsonl(path)]
    done_ids = Counter(row["id"] for row in kept + rejected)
    repeated = [sample for sample, count in done_ids.items() if count > 1]
    if repeated:
        raise SynthError(f"{folder} holds samples written twice ({repeated[:3]}...); it was edited by hand.")
    expansion_tokens = sum(manifest["expansion_usage"].values())
    used = sum(row["prompt_tokens"] + row["completion_tokens"] for row in kept + rejected) + expansion_tokens
    budget = TokenBudget(args.max_total_tokens, used)

    prompts_path = folder / PROMPTS
    if prompts_path.is_file():
        prompts = [Prompt(**row) for row in read_jsonl(prompts_path)]
        if source_prompts is not None and [p.id for p in source_prompts] != [p.id for p in prompts]:
            raise ConfigError(
                f"The prompts in {args.prompts!r} changed since {folder} was started. Resume with the same prompts "
                "or choose another --output_dir."
            )
    else:
        if source_prompts is not None:
            prompts = source_prompts
        else:
            prompts, expansion_usage = expand_topics(args, template, parameters, backend, budget)
            manifest["expansion_usage"] = expansion_usage
        _write_jsonl_atomic(prompts_path, [p.__dict__ for p in prompts])

    total = len(prompts) * args.samples_per_prompt
    planned: dict[str, dict[str, Any]] = {}
    for index, prompt in enumerate(prompts):
        for k in range(args.samples_per_prompt):
            ordinal = index * args.samples_per_prompt + k
            sample_id = f"{prompt.id}-{k}"
            planned[sample_id] = {"prompt": prompt, "k": k, "ordinal": ordinal}
    pending = [sample_id for sample_id in planned if sample_id not in done_ids]
    if done_ids:
        logger.info("Resuming %s: %d of %d samples already written.", folder, len(done_ids), total)
    seen_texts = {_dedup_key(row["completion"]): row["id"] for row in kept}

    def request_for(sample_id: str) -> GenerationRequest:
        entry = planned[sample_id]
        messages, raw = template.request(entry["prompt"].prompt, parameters)
        return GenerationRequest(
            id=sample_id,
            messages=messages,
            prompt=raw,
            temperature=temperature_at(args, entry["ordinal"], total),
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=_sample_seed(args.seed, sample_id),
        )

    state = {"samples": [], "rejected": [], "failed": {}, "last_flush": time.monotonic(), "written": 0}
    session = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "samples": 0, "rejected": 0, "seconds": 0.0}
    manifest["sessions"].append(session)

    def flush(status: str) -> None:
        for key, prefix in (("samples", SAMPLES_PREFIX), ("rejected", REJECTED_PREFIX)):
            rows, state[key] = state[key], []  # taken first: a signal mid-write can lose rows, never repeat them
            if rows:
                existing = shard_files(folder, prefix)
                index = int(existing[-1].stem[len(prefix) :]) + 1 if existing else 0
                _write_jsonl_atomic(folder / f"{prefix}{index:05d}.jsonl", rows)
        state["last_flush"] = time.monotonic()
        _update_manifest(folder, manifest, status, planned, state["failed"], budget)

    def requests() -> Iterator[GenerationRequest]:
        for sample_id in pending:
            # The backend asks for the next request once the results before it were handed over (a batch is
            # done, an API slot is free): the moment to write a shard if the last one is getting old.
            if time.monotonic() - state["last_flush"] >= args.flush_seconds:
                session["seconds"] = round(time.monotonic() - started, 3)
                flush(status)
            yield request_for(sample_id)

    started = time.monotonic()
    status = "running"
    flush(status)
    # One tick per answered request (kept, rejected or failed), counting the samples a resumed run already has.
    progress = tqdm(total=total, initial=len(done_ids), desc="distily synth", unit="sample", mininterval=1.0)
    try:
        for generation in backend.generate(budget.gate(requests(), backend)):
            progress.update(1)
            budget.settle(generation)
            if generation.error:
                state["failed"][generation.id] = generation.error
                logger.warning("Sample %s failed: %s", generation.id, generation.error)
                continue
            state["failed"].pop(generation.id, None)
            row = _record(planned[generation.id], generation, template, request_for(generation.id), backend)
            key = _dedup_key(row["completion"])
            if not row["completion"].strip():
                state["rejected"].append({**row, "rejected": "empty"})
                session["rejected"] += 1
            elif args.dedup and key in seen_texts:
                state["rejected"].append({**row, "rejected": "duplicate", "duplicate_of": seen_texts[key]})
                session["rejected"] += 1
            else:
                seen_texts.setdefault(key, row["id"])
                state["samples"].append(row)
                session["samples"] += 1
            if len(state["samples"]) + len(state["rejected"]) >= args.shard_size:
                session["seconds"] = round(time.monotonic() - started, 3)
                flush(status)
        status = "finished"
    except BaseException:
        status = "interrupted"
        raise
    finally:
        progress.close()
        session["seconds"] = round(time.monotonic() - started, 3)
        session["samples_per_second"] = round(session["samples"] / session["seconds"], 4) if session["seconds"] else 0
        session["ended_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        session["retries"] = getattr(backend, "retries", 0)
        if status == "finished":
            status = "incomplete" if state["failed"] else ("budget_exhausted" if budget.exhausted else "finished")
        flush(status)
    return SynthResult(folder, status, _read_manifest(folder))


def _record(entry: dict, generation: Generation, template: TaskTemplate, request: GenerationRequest, backend) -> dict:
    prompt: Prompt = entry["prompt"]
    return {
        "id": generation.id,
        "prompt_id": prompt.id,
        "sample_index": entry["k"],
        "ordinal": entry["ordinal"],
        "source": prompt.source,
        "template": template.name,
        "prompt": prompt.prompt,
        "messages": request.messages,
        "input": request.prompt,
        "completion": generation.text,
        "finish_reason": generation.finish_reason,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "attempts": generation.attempts,
        "backend": backend.name,
    }


def _update_manifest(folder: Path, manifest: dict, status: str, planned: dict, failed: dict, budget) -> None:
    """Counts and usage recomputed from the shards on disk (the truth), then the manifest written atomically."""
    shards, usage, kept_ids, rejected = [], Counter(), set(), Counter()
    for prefix in (SAMPLES_PREFIX, REJECTED_PREFIX):
        for path in shard_files(folder, prefix):
            rows = read_jsonl(path)
            shards.append(
                {"file": path.name, "rows": len(rows), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            )
            for row in rows:
                usage["prompt_tokens"] += row["prompt_tokens"]
                usage["completion_tokens"] += row["completion_tokens"]
                if prefix == SAMPLES_PREFIX:
                    kept_ids.add(row["id"])
                    usage["samples_truncated"] += row["finish_reason"] == "length"
                else:
                    rejected[row["rejected"]] += 1
    done = len(kept_ids) + sum(rejected.values())
    expansion = manifest.get("expansion_usage", {})
    manifest.update(
        status=status,
        updated_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        counts={
            "prompts": len({entry["prompt"].id for entry in planned.values()}),
            "planned_samples": len(planned),
            "samples": len(kept_ids),
            "rejected": dict(rejected),
            "failed": len(failed),
            "pending": len(planned) - done,
            "truncated_samples": usage.pop("samples_truncated", 0),
        },
        failures=dict(list(failed.items())[:20]),
        usage={
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "expansion_tokens": sum(expansion.values()),
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"] + sum(expansion.values()),
        },
        shards=shards,
    )
    if status in ("finished", "budget_exhausted", "incomplete"):
        manifest["finished_at"] = manifest["updated_at"]
    write_json_atomic(folder / MANIFEST, manifest)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def synth_command(argv: list[str]) -> int:
    """``distily synth ...``: 0 when every planned sample is written (or the budget was reached), 1 otherwise."""
    from ..cli import parse_with_yaml
    from ..run import main_command

    teacher_args, args = parse_with_yaml(argv, classes=SYNTH_ARGUMENT_CLASSES, prog="distily synth")

    def stop(signum, frame):  # SIGTERM: write the samples already generated, then exit
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        result = synthesize(args, teacher_args, command=main_command())
    except SynthError as err:
        print(f"distily synth: error: {err}", flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    counts, usage = result.counts, result.manifest["usage"]
    session = result.manifest["sessions"][-1]
    print(
        f"{result.status}: {counts['samples']} samples of {counts['planned_samples']} planned "
        f"({sum(counts['rejected'].values())} rejected, {counts['failed']} failed, {counts['pending']} pending) in "
        f"{result.output_dir}; {usage['total_tokens']} tokens; this run {session['samples']} samples in "
        f"{session['seconds']:.1f} s ({session['samples_per_second']:.2f} samples/s).",
        flush=True,
    )
    if result.status == "incomplete":
        print("Some requests failed for good (see failures in the manifest); rerun the same command to retry them.")
        return 1
    return 0
