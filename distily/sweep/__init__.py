"""Optuna sweeps over distillation settings: ``distily sweep sweeps/X.yaml`` or, from Python::

    from distily.sweep import load_sweep, run_sweep

    sweep = load_sweep("sweeps/loss_and_temperature.yaml", n_trials=8, fixed_overrides={"max_steps": 50})
    result = run_sweep(sweep)
    print(result.best[0]["command"])

See ``docs/sweeps.md``.
"""

from .config import PRUNERS, SAMPLERS, SweepConfig, load_sweep
from .runner import SweepResult, run_sweep
from .space import SearchParam

__all__ = ["PRUNERS", "SAMPLERS", "SearchParam", "SweepConfig", "SweepResult", "load_sweep", "run_sweep"]
