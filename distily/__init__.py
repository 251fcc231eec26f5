"""distily: distil large language models into small, fast students.

Public API::

    from distily import DistillationConfig, DistillationTrainer, build_student, register_loss, LOSSES
    from distily import register_layer_mapper, register_projector, register_feature_loss  # intermediate signals
    from distily import train_tokenizer, build_student_with_tokenizer, bits_per_byte  # a student's own tokenizer
"""

from .config import DataArguments, DistillationConfig, StudentArguments, TeacherArguments
from .errors import ConfigError, DistilyError
from .feature_losses import FEATURE_LOSSES, FEATURE_NORMS, register_feature_loss, register_feature_norm
from .layer_mappers import LAYER_MAPPERS, map_layers, register_layer_mapper
from .losses import LOSSES, build_loss, distillation_loss, register_loss
from .projectors import PROJECTORS, build_projector, register_projector
from .pruning import prune
from .registry import Registry, UnknownNameError
from .students import build_student, build_student_with_tokenizer
from .teacher.ensemble import TeacherEnsemble, TeacherMember
from .teacher.loading import EMBEDDED_TEACHERS, load_teacher
from .teacher.synth import SynthArguments, synthesize
from .teacher.templates import TEMPLATES, TaskTemplate, register_template
from .tokenizer import bits_per_byte, train_tokenizer
from .trainer import DistillationTrainer
from .version import __version__

__all__ = [
    "EMBEDDED_TEACHERS",
    "FEATURE_LOSSES",
    "FEATURE_NORMS",
    "LAYER_MAPPERS",
    "LOSSES",
    "PROJECTORS",
    "TEMPLATES",
    "ConfigError",
    "DataArguments",
    "DistillationConfig",
    "DistillationTrainer",
    "DistilyError",
    "Registry",
    "StudentArguments",
    "SynthArguments",
    "TaskTemplate",
    "TeacherArguments",
    "TeacherEnsemble",
    "TeacherMember",
    "UnknownNameError",
    "__version__",
    "bits_per_byte",
    "build_loss",
    "build_projector",
    "build_student",
    "build_student_with_tokenizer",
    "distillation_loss",
    "load_teacher",
    "map_layers",
    "prune",
    "register_feature_loss",
    "register_feature_norm",
    "register_layer_mapper",
    "register_loss",
    "register_projector",
    "register_template",
    "synthesize",
    "train_tokenizer",
]
