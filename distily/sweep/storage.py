"""Where a study lives, and how workers that share it notice trials whose worker died.

Storage URLs:

* ``sqlite:///path/study.db`` (the default, in the sweep folder): several worker processes on one machine;
* any other SQLAlchemy URL, e.g. ``postgresql://user:password@host:5432/db``: workers on many machines join the
  same study (``pip install 'distily[postgres]'`` for the driver);
* ``journal:PATH``: Optuna's append-only journal file, for file systems where SQLite locking is unreliable.

Dead trials. Every running trial carries two user attributes that its worker keeps fresh: ``worker`` (host,
PID namespace and process id) and ``heartbeat`` (the time of its last beat, every ``heartbeat_interval`` s).
Before each trial, a worker marks as failed every running trial that is provably dead:

* its worker ran on this host, in this PID namespace, and that process no longer exists (a killed sweep that
  is rerun on the same machine fails its dead trial at once); or
* its heartbeat is older than ``grace_period`` (a worker on another machine died, or the machine did).

A live worker's trial never matches either rule (its process exists; its heartbeat is fresh), so any number
of workers can do this safely at once. This works the same for every storage (Optuna's own heartbeat is
RDB-only), and failing a trial is a conditional state change that only one worker can win.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run_folder import FAILED, RunFolder
from ..run_folder import now as timestamp

logger = logging.getLogger(__name__)

JOURNAL_PREFIX = "journal:"


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and summaries)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_storage(url: str, create_dirs: Path | None = None):
    """An Optuna storage for ``url``, connected and checked; any problem is a :class:`ConfigError`.

    ``create_dirs`` is the sweep folder, created for the default SQLite file; any other path's folder must exist.
    """

    if create_dirs is not None:
        create_dirs.mkdir(parents=True, exist_ok=True)
    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(re.sub(r"^//", "", url[len(JOURNAL_PREFIX) :])).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"Storage {url!r}: folder {str(path.parent)!r} does not exist. Create it first.")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise ConfigError(f"Storage {url!r} cannot be opened: {err}.") from None
    if "://" not in url:
        raise ConfigError(
            f"Storage {url!r} is not a URL. Use sqlite:///path/study.db, postgresql://user:password@host/db "
            "(any SQLAlchemy URL) or journal:path/study.log."
        )
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        database = url.split(":///", 1)[-1]
        if database and database != ":memory:" and not Path(database).expanduser().parent.is_dir():
            raise ConfigError(f"Storage {url!r}: folder {str(Path(database).parent)!r} does not exist.")
        # Workers on one machine write to the same file: wait for the lock rather than fail at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    elif url.startswith(("postgresql", "postgres:")):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        return _rdb_storage(_postgres_driver(url), engine_kwargs)
    except ImportError as err:  # Optuna turns a missing driver into a plain ImportError
        extra = " Install it with: pip install 'distily[postgres]'." if url.startswith("postgres") else ""
        raise ConfigError(f"Storage {mask_url(url)!r} needs a database driver that is not installed.{extra}") from err
    except Exception as err:  # SQLAlchemy's connection errors have no common base worth naming here
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"Cannot open storage {mask_url(url)!r}: {first_line}. Check the URL, that the database server is "
            "running and reachable from this machine, and the user's password."
        ) from None


def _postgres_driver(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy's default differs between versions
    (psycopg2 in 2.0, psycopg 3 in 2.1), and ``distily[postgres]`` installs psycopg 3."""
    import importlib.util

    scheme, rest = url.split("://", 1)
    if scheme not in ("postgresql", "postgres"):
        return url  # a driver was named explicitly
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return f"postgresql://{rest}"


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], attempts: int = 5):
    """``RDBStorage``, retried when workers starting together race to create the tables of a new database."""
    import random

    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, ProgrammingError):  # another worker created the same table or row first
            if attempt == attempts:
                raise
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------------------
# Workers and heartbeats


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "-"


def worker_id() -> str:
    """``host|pid-namespace|pid``: enough to tell, on the same host, whether a worker process still exists."""
    return f"{socket.gethostname()}|{_pid_namespace()}|{os.getpid()}"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def local_worker_is_dead(worker: str | None) -> bool:
    """True only when ``worker`` ran on this host and PID namespace and its process is gone."""
    if not worker or worker.count("|") != 2:
        return False
    host, namespace, pid = worker.split("|")
    if host != socket.gethostname() or namespace != _pid_namespace() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _process_exists(int(pid))


class Heartbeat:
    """Keeps a running trial's ``heartbeat`` attribute fresh from a background thread."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"distily-heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception as err:  # a finished trial, or a storage hiccup: the next beat may work
                logger.debug("Heartbeat of trial id %d not recorded: %s", self.trial_id, err)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def update_run_manifest(output_dir: str | Path | None, **updates) -> bool:
    """Record a trial's outcome in its run folder's manifest (when the folder is on this machine)."""
    if not output_dir:
        return False
    return RunFolder(output_dir).update_manifest(**updates)


def fail_dead_trials(study, storage, grace_period: float) -> list[int]:
    """Mark the study's provably dead running trials as failed (see the module docstring). Returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    now = time.time()
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get("heartbeat")
        if beat is None and trial.datetime_start is not None:
            beat = trial.datetime_start.timestamp()
        age = now - beat if beat is not None else float("inf")
        worker = trial.user_attrs.get("worker")
        if local_worker_is_dead(worker):
            reason = f"its worker process ({worker}) is gone"
        elif age > grace_period:
            reason = f"no heartbeat for {age:.0f} s (grace_period {grace_period:g} s)"
        else:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "error", f"worker died: {reason}")
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first, or the trial just finished
        logger.warning("Trial %d marked failed: %s.", trial.number, reason)
        if worker and worker.split("|")[0] == socket.gethostname():
            # Its run folder is on this machine (another machine's folder may have the same path here).
            update_run_manifest(
                trial.user_attrs.get("output_dir"),
                status=FAILED,
                failed_at=timestamp(),
                error=f"worker died: {reason}",
            )
        failed.append(trial.number)
    return failed
