"""distily: distil large language models into small, fast students.

Public API::

    from distily import DistillationConfig, DistillationTrainer, build_student, register_loss, LOSSES
"""

from .config import ConfigError, DataArguments, DistillationConfig, StudentArguments, TeacherArguments
from .losses import LOSSES, build_loss, distillation_loss, register_loss
from .registry import Registry, UnknownNameError
from .students import build_student
from .teacher.loading import EMBEDDED_TEACHERS, load_teacher
from .teacher.synth import SynthArguments, synthesize
from .teacher.templates import TEMPLATES, TaskTemplate, register_template
from .trainer import DistillationTrainer

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_TEACHERS",
    "LOSSES",
    "TEMPLATES",
    "ConfigError",
    "DataArguments",
    "DistillationConfig",
    "DistillationTrainer",
    "Registry",
    "StudentArguments",
    "SynthArguments",
    "TaskTemplate",
    "TeacherArguments",
    "UnknownNameError",
    "__version__",
    "build_loss",
    "build_student",
    "distillation_loss",
    "load_teacher",
    "register_loss",
    "register_template",
    "synthesize",
]
