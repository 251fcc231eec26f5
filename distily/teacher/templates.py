"""Task templates for ``distily synth``: how one prompt becomes a request to the teacher.

A template turns a user's prompt (a question, a task, the head of a document) into what the teacher is asked:
chat messages for instruction-following teachers, or raw text to continue. It can also say how to ask the
teacher for prompts about a seed topic (``expand``), so a few topics become many prompts.

Built in: ``continuation`` (raw text, no chat), ``qa`` (the prompt is a question, the teacher answers) and
``code`` (the prompt is a task, the teacher writes a function in ``{language}``). Add your own with
:func:`register_template` or pass a YAML/JSON file of the same fields to ``--template``. Parameters such as the
language live in ``--template_kwargs``, never in the template's name.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..registry import Registry


@dataclass(frozen=True)
class TaskTemplate:
    """One kind of synthetic sample.

    ``instruction`` is a ``str.format`` pattern with ``{prompt}`` and any parameter in ``defaults`` (overridden by
    ``--template_kwargs``). With ``chat=True`` it becomes the user message (after an optional ``system``
    message); with ``chat=False`` it is the text the teacher continues. ``expand`` is the instruction that asks
    the teacher for ``{n}`` prompts about a ``{topic}``, one per line (needed only for ``--seed_topics``).
    """

    name: str
    description: str
    instruction: str = "{prompt}"
    chat: bool = True
    system: str | None = None
    expand: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if "{prompt}" not in self.instruction:
            raise ConfigError(f"Template {self.name!r}: its instruction must contain '{{prompt}}'.")
        if self.expand is not None and not {"topic", "n"} <= _placeholders(self.expand):
            raise ConfigError(f"Template {self.name!r}: its expand instruction must contain '{{topic}}' and '{{n}}'.")

    def parameters(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The template's parameters: its defaults updated by ``overrides``; unknown or missing names are errors."""
        values = {**self.defaults, **(overrides or {})}
        wanted = _placeholders(self.instruction) | _placeholders(self.expand or "") | _placeholders(self.system or "")
        wanted -= {"prompt", "topic", "n"}
        unknown = sorted(set(values) - wanted)
        if unknown:
            raise ConfigError(
                f"--template_kwargs sets {unknown}, which template {self.name!r} does not use. Its parameters: "
                f"{sorted(wanted) or 'none'}."
            )
        missing = sorted(wanted - set(values))
        if missing:
            raise ConfigError(
                f"Template {self.name!r} needs {missing}: pass them in --template_kwargs, e.g. "
                f'--template_kwargs \'{{"{missing[0]}": "..."}}\'.'
            )
        return values

    def request(self, prompt: str, parameters: dict[str, Any]) -> tuple[list[dict[str, str]] | None, str | None]:
        """``(messages, None)`` for a chat template, ``(None, text)`` for a continuation template."""
        text = self.instruction.format(prompt=prompt, **parameters)
        if not self.chat:
            return None, text
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format(**parameters)})
        messages.append({"role": "user", "content": text})
        return messages, None

    def expansion(self, topic: str, n: int, parameters: dict[str, Any]) -> list[dict[str, str]]:
        """Chat messages asking the teacher for ``n`` prompts about ``topic``."""
        if self.expand is None:
            raise ConfigError(
                f"Template {self.name!r} cannot expand seed topics (it has no expand instruction). Give prompts "
                "with --prompts, or use a template that can (qa, code)."
            )
        return [{"role": "user", "content": self.expand.format(topic=topic, n=n, **parameters)}]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _placeholders(pattern: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(pattern) if name}


TEMPLATES: Registry[TaskTemplate] = Registry("task template", "register_template")


def register_template(template: TaskTemplate, *, override: bool = False) -> TaskTemplate:
    """Add ``template`` to :data:`TEMPLATES` under its name (``override=True`` to replace one)."""
    return TEMPLATES.register(template.name, override=override)(template)


def load_template(name_or_path: str) -> TaskTemplate:
    """A registered template by name, or one defined in a ``.yaml``/``.yml``/``.json`` file of its fields."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml", ".json"):
        from ..config import load_yaml_file

        if not path.is_file():
            raise ConfigError(f"Template file {name_or_path!r} does not exist. Check --template.")
        values = load_yaml_file(path)  # YAML is a superset of JSON
        values.setdefault("name", path.stem)
        values.setdefault("description", f"template from {path.name}")
        known = set(TaskTemplate.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"Template file {name_or_path!r} has unknown fields {unknown}; valid: {sorted(known)}.")
        return TaskTemplate(**values)
    if name_or_path not in TEMPLATES:
        raise ConfigError(TEMPLATES.unknown_message(name_or_path) + " Or pass a .yaml template file to --template.")
    return TEMPLATES[name_or_path]


register_template(
    TaskTemplate(
        name="continuation",
        description="Plain continuation: the teacher continues the prompt text (no chat template).",
        chat=False,
    )
)
register_template(
    TaskTemplate(
        name="qa",
        description="Instruction/answer pairs: the prompt is a question or instruction, the teacher answers it.",
        expand=(
            "Write {n} different questions that a {audience} might ask about {topic}. Write one question per line, "
            "with no numbering and no answers."
        ),
        defaults={"audience": "Python programmer"},
    )
)
register_template(
    TaskTemplate(
        name="code",
        description="Code: the prompt is a task, the teacher writes a {language} function that does it.",
        instruction="Write a {language} function that {prompt} Reply with only the code, in one code block.",
        expand=(
            "List {n} different small programming tasks about {topic} that a {language} function could do. Write "
            "each task on its own line, starting with a verb in lower case (for example: returns the n-th "
            "Fibonacci number.), with no numbering."
        ),
        defaults={"language": "Python"},
    )
)
