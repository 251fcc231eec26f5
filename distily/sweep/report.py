"""A study's summary (best trial, its repro command, every trial) and plots, written into the sweep folder.

* ``summary.json`` and ``summary.md``: counts by state, the best trial (the Pareto front for multi-objective
  sweeps) with its settings, metrics, geometric and arithmetic means and the command that reproduces it, and a
  row per trial;
* ``best/trial-NNNN.yaml``: each best trial's full run config, runnable on any machine with
  ``distily --config`` (rebuilt from the study, so it exists even when the trial ran elsewhere);
* ``plots/``: optimisation history, parameter importances and parallel coordinates (plus the Pareto front for
  multi-objective sweeps), each as PNG (matplotlib) and HTML (plotly; the HTML files share one
  ``plotly.min.js`` beside them, so they open offline).
"""

from __future__ import annotations

import logging
import math
import shlex
import time
import warnings
from pathlib import Path
from typing import Any

from ..config import config_to_dict
from ..io import atomic_path, write_json_atomic, write_text_atomic, write_yaml_atomic
from .config import SweepConfig, quiet_experimental, run_configs
from .storage import mask_url

logger = logging.getLogger(__name__)

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def _config_values(sweep: SweepConfig, params: dict[str, Any]) -> dict[str, Any]:
    by_path = {param.path: param for param in sweep.params}
    return {path: by_path[path].decode(value) if path in by_path else value for path, value in params.items()}


def _trial_row(sweep: SweepConfig, trial) -> dict[str, Any]:
    attrs = trial.user_attrs
    row = {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": _config_values(sweep, trial.params),
        "metrics": attrs.get("metrics"),
        "geometric_mean": attrs.get("geometric_mean"),
        "arithmetic_mean": attrs.get("arithmetic_mean"),
        "seconds": attrs.get("seconds"),
        "output_dir": attrs.get("output_dir"),
        "worker": attrs.get("worker"),
    }
    if trial.state.name == "PRUNED" and trial.intermediate_values:
        step = max(trial.intermediate_values)
        row["pruned_at_step"] = step
        row["last_intermediate_value"] = trial.intermediate_values[step]
    if attrs.get("error"):
        row["error"] = attrs["error"]
    return row


def best_trials(sweep: SweepConfig, study) -> list:
    """The best completed trial, or the Pareto front of a multi-objective study (empty before any completes)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    return list(study.best_trials) if sweep.multi_objective else [study.best_trial]


def write_report(sweep: SweepConfig, study) -> dict[str, Any]:
    """Write summary.json, summary.md, best/*.yaml and plots/ for ``study``; returns the summary."""
    from optuna.trial import TrialState

    directory = sweep.directory
    trials = study.get_trials(deepcopy=False)
    counts = {state.lower(): sum(t.state.name == state for t in trials) for state in STATES}
    best = []
    winners = best_trials(sweep, study)
    keep = {f"trial-{trial.number:04d}.yaml" for trial in winners}
    for stale in (directory / "best").glob("trial-*.yaml"):  # trials that were best before a better one came
        if stale.name not in keep:
            stale.unlink()
    for trial in winners:
        row = _trial_row(sweep, trial)
        config_file = directory / "best" / f"trial-{trial.number:04d}.yaml"
        repro_dir = directory / "repro" / f"trial-{trial.number:04d}"
        # The fully resolved config (every field), like the one saved in the trial's own run folder.
        configs = run_configs(sweep.config_from_params(trial.params, repro_dir), f"Trial {trial.number}'s config")
        write_yaml_atomic(config_file, config_to_dict(*configs))
        row["config_file"] = str(config_file)
        row["command"] = shlex.join(["distily", "--config", str(config_file)])
        best.append(row)
    finished = [t for t in trials if t.state != TrialState.WAITING]
    summary = {
        "study": sweep.name,
        "storage": mask_url(sweep.storage_url),
        "source": sweep.source,
        "n_trials": sweep.n_trials,
        "metrics": sweep.metrics,
        "directions": sweep.directions,
        "multi_objective": sweep.multi_objective,
        "objective": "values per metric" if sweep.multi_objective else f"geometric mean of {', '.join(sweep.metrics)}",
        "sampler": sweep.sampler,
        "pruner": sweep.pruner,
        "counts": counts,
        "best": best,
        "trials": [_trial_row(sweep, t) for t in sorted(finished, key=lambda t: t.number)],
        "plots": write_plots(sweep, study, directory / "plots"),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(directory / "summary.json", summary)
    write_text_atomic(directory / "summary.md", summary_markdown(summary))
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def summary_markdown(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in summary["counts"].items() if n)
    lines = [
        f"# Sweep `{summary['study']}`",
        "",
        f"- storage: `{summary['storage']}`",
        f"- objective: {summary['objective']} ({', '.join(summary['directions'])})",
        f"- sampler: {summary['sampler']}, pruner: {summary['pruner']}, n_trials: {summary['n_trials']}",
        f"- trials: {counts or 'none yet'}",
        "",
        "## Best trial" + ("s (Pareto front)" if summary["multi_objective"] else ""),
        "",
    ]
    if not summary["best"]:
        lines.append("No trial has completed yet.")
    for row in summary["best"]:
        means = (
            f" (geometric mean {_fmt(row['geometric_mean'])}, arithmetic mean {_fmt(row['arithmetic_mean'])})"
            if row.get("geometric_mean") is not None
            else ""
        )
        lines += [
            f"### Trial {row['number']}: {_fmt(row['values'])}",
            "",
            f"- settings: `{row['params']}`",
            f"- metrics: `{row['metrics']}`{means}",
            f"- run folder: `{row['output_dir']}`",
            f"- reproduce: `{row['command']}`",
            "",
        ]
    lines += ["## Trials", "", "| trial | state | objective | geometric mean | arithmetic mean | settings | note |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for row in summary["trials"]:
        note = row.get("error") or (
            f"pruned at step {row['pruned_at_step']}" if row.get("pruned_at_step") is not None else ""
        )
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in row["params"].items())
        lines.append(
            f"| {row['number']} | {row['state']} | {_fmt(row['values'])} | {_fmt(row['geometric_mean'])} | "
            f"{_fmt(row['arithmetic_mean'])} | {settings} | {note.replace('|', '/')[:200]} |"
        )
    lines += ["", "## Plots", ""]
    for name, entry in summary["plots"].items():
        if "skipped" in entry:
            lines.append(f"- {name}: skipped ({entry['skipped']})")
        else:
            lines.append(f"- {name}: [{Path(entry['png']).name}](plots/{Path(entry['png']).name}), "
                         f"[{Path(entry['html']).name}](plots/{Path(entry['html']).name})")  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Plots


def _plot_specs(sweep: SweepConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """(file name, optuna plot function name, keyword arguments) for every plot of this sweep."""
    if sweep.multi_objective:
        first = {"target": lambda t: t.values[0], "target_name": sweep.metrics[0]}
        # Importances with a target explain *low* target values: negate a metric that is maximised.
        sign = -1.0 if sweep.directions[0] == "maximize" else 1.0
        importance = {"target": lambda t: sign * t.values[0], "target_name": sweep.metrics[0]}
        return [
            ("pareto_front", "plot_pareto_front", {"target_names": sweep.metrics}),
            ("optimization_history", "plot_optimization_history", first),
            ("param_importances", "plot_param_importances", importance),
            ("parallel_coordinate", "plot_parallel_coordinate", first),
        ]
    combined = f"geometric mean of {', '.join(sweep.metrics)}" if len(sweep.metrics) > 1 else sweep.metrics[0]
    name = {"target_name": combined}
    return [
        ("optimization_history", "plot_optimization_history", name),
        ("param_importances", "plot_param_importances", name),
        ("parallel_coordinate", "plot_parallel_coordinate", name),
    ]


def write_plots(sweep: SweepConfig, study, plots_dir: Path) -> dict[str, dict[str, str]]:
    """Each plot as PNG and HTML; a plot that cannot be drawn yet (too few trials) is skipped with the reason."""
    import matplotlib.pyplot as plt
    import optuna.visualization as plotly_plots
    import optuna.visualization.matplotlib as mpl_plots
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    results: dict[str, dict[str, str]] = {}
    if not complete:
        return {name: {"skipped": "no completed trial yet"} for name, _, _ in _plot_specs(sweep)}
    plots_dir.mkdir(parents=True, exist_ok=True)
    _write_plotly_js(plots_dir)
    for name, function, kwargs in _plot_specs(sweep):
        if name == "param_importances" and len(complete) < 2:
            results[name] = {"skipped": "needs at least 2 completed trials"}
            continue
        png, html = plots_dir / f"{name}.png", plots_dir / f"{name}.html"
        try:
            with quiet_experimental(), warnings.catch_warnings():
                # PED-ANOVA's notes on few trials per regime and on target direction (handled above), and
                # matplotlib's on an axis whose parameter took one value so far.
                warnings.filterwarnings("ignore", "Attempting to set identical low and high", UserWarning)
                warnings.filterwarnings("ignore", "Some regimes for parameter", UserWarning)
                warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)
                figure = getattr(plotly_plots, function)(study, **kwargs)
                axes = getattr(mpl_plots, function)(study, **kwargs)
            write_text_atomic(html, figure.to_html(include_plotlyjs="directory", full_html=True))
            mpl_figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            try:
                with atomic_path(png) as tmp:
                    mpl_figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
            finally:
                plt.close(mpl_figure)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            results[name] = {"skipped": f"{type(err).__name__}: {err}"}
            continue
        results[name] = {"png": str(png), "html": str(html)}
    return results


def _write_plotly_js(plots_dir: Path) -> None:
    """The plotly.js bundle the HTML plots load (written once; the HTML then opens without a network)."""
    from plotly.offline import get_plotlyjs

    path = plots_dir / "plotly.min.js"
    bundle = get_plotlyjs()
    if not path.is_file() or path.read_text(encoding="utf-8") != bundle:
        write_text_atomic(path, bundle)
