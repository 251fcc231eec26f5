"""Structured pruning (Minitron-style): cut a teacher's layers, heads, neurons and channels by importance measured
on calibration blocks, so a student starts from the teacher's best units instead of a uniform layer subset.

* :mod:`.families` -- where each supported architecture keeps its units, and the slicing rule of every tensor;
* :mod:`.importance` -- forward hooks and scores (heads, neurons, channels, layers);
* :mod:`.plan` -- the target shape checked against the teacher, and the units kept;
* :mod:`.trim` -- the cut itself;
* :mod:`.report` -- ``distily_prune.json``;
* :mod:`.pipeline` -- :func:`prune`, the three steps in one call;
* :mod:`.calibration` -- calibration blocks from the train split; ``--student_init prune``;
* :mod:`.command` -- ``distily prune``.

See docs/pruning.md.
"""

from __future__ import annotations

from .families import FAMILIES, Family, Shape, family_of
from .importance import Importance, Stat, measure_importance
from .pipeline import check_prunable, prune
from .plan import KeepPlan, choose, resolve_target
from .report import PruneReport, calibration_fingerprint
from .trim import trim

__all__ = [
    "FAMILIES",
    "Family",
    "Importance",
    "KeepPlan",
    "PruneReport",
    "Shape",
    "Stat",
    "calibration_fingerprint",
    "check_prunable",
    "choose",
    "family_of",
    "measure_importance",
    "prune",
    "resolve_target",
    "trim",
]
