"""Where a study's Optuna study lives: a database, so ``optuna-dashboard <URL>`` opens TPE's trials.

Ray's ``OptunaSearch`` keeps its ``optuna.Study`` in memory unless it is given a
storage; with an ``RDBStorage`` every ask, intermediate value and tell goes to the
database (``create_study(load_if_exists=True)`` under the study's name), and Tune's
searcher checkpoint keeps only the URL (``RDBStorage.__getstate__`` drops the engine),
so a resume goes on in the same Optuna study.

Default: ``<workdir>/optuna.db`` beside the MLflow store ``mlflow.db``, every study of a
work dir in one file, as MLflow keeps them. SQLite cannot live in an object store: with
an ``s3://`` work dir the default is a file of the study's own on the driver's disk
(said when the study starts; a new file per study, since the same name in another
bucket is another study); a team gives ``--optuna-storage postgresql://user@host:5432/optuna``,
a database of its own on the tracking database's server.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from mfcon import storage

OPTUNA_STORAGE_ENV = "MFCON_OPTUNA_STORAGE"
SCHEMES = ("sqlite", "postgresql", "mysql")  # the databases Optuna's RDBStorage keeps studies in
CONNECT_TIMEOUT_S = 10


class OptunaStorageError(ValueError):
    """A storage URL that cannot hold the study's Optuna study; the message says what to give instead."""


def driver_data_dir() -> Path:
    """This machine's data folder for mfcon: ``$XDG_DATA_HOME/mfcon`` (default ``~/.local/share/mfcon``)."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "mfcon"


def default_storage(workdir: str | Path, name: str) -> str:
    """``sqlite:////abs/<workdir>/optuna.db``; for an object-store ``workdir``, ``<name>-<UTC time>.db`` under
    :func:`driver_data_dir` ``/optuna``."""
    if storage.is_remote(workdir):
        return f"sqlite:///{driver_data_dir() / 'optuna' / time.strftime(f'{name}-%Y%m%dT%H%M%S.db', time.gmtime())}"
    return f"sqlite:///{Path(workdir).resolve() / 'optuna.db'}"


def on_driver_disk(url: str) -> bool:
    return url.startswith(f"sqlite:///{driver_data_dir()}/")


def resolve_storage(explicit: str | None, workdir: str | Path, name: str = "study") -> str:
    """``--optuna-storage``, then ``$MFCON_OPTUNA_STORAGE``, then :func:`default_storage`; SQLite paths made
    absolute (a relative one would move with the driver's working folder), and a PostgreSQL URL without a driver
    given psycopg2's (SQLAlchemy 2.1 would pick psycopg 3, which mfcon does not install).

    >>> resolve_storage("postgresql://mfcon@db:5432/optuna", "runs")
    'postgresql+psycopg2://mfcon@db:5432/optuna'
    """
    url = explicit or os.environ.get(OPTUNA_STORAGE_ENV) or default_storage(workdir, name)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    path = url[len("sqlite:///"):]
    if url.startswith("sqlite:///") and not path.startswith("/") and "://" not in path:
        url = f"sqlite:///{Path(path).resolve()}"
    return url


def dashboard_command(url: str) -> str:
    """What a person types to open the storage (the password masked)."""
    return f"optuna-dashboard {storage.mask_uri(url)}"


def open_storage(url: str):
    """An ``optuna.storages.RDBStorage`` on ``url`` (tables created when new), or one readable
    :class:`OptunaStorageError` line: a scheme Optuna cannot use, a folder that cannot be made, a database that
    does not answer within ``CONNECT_TIMEOUT_S`` or refuses the login."""
    shown = storage.mask_uri(url)
    scheme = urlsplit(url).scheme.split("+")[0].lower()
    if "://" not in url or scheme not in SCHEMES:
        raise OptunaStorageError(f"--optuna-storage {shown}: not a database Optuna can keep a study in; give "
                                 "sqlite:////abs/path/optuna.db or postgresql://user@host:5432/optuna")
    kwargs = {}
    if scheme == "sqlite":
        if "://" in url[len("sqlite:///"):]:
            raise OptunaStorageError(f"--optuna-storage {shown}: SQLite cannot live in an object store; give a path on "
                                     "this machine or postgresql://user@host:5432/optuna")
        try:
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OptunaStorageError(f"--optuna-storage {shown}: cannot create its folder ({e.strerror})") from None
    elif scheme == "postgresql":
        kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    import optuna

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 - a driver, a login, a file or a network error all mean the same here
        if isinstance(e, ImportError):
            e = e.__cause__ or e  # Optuna's "install appropriate one" hides which driver is missing
        reason = storage.mask_uri(str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OptunaStorageError(f"--optuna-storage {shown}: unusable ({reason})") from None


def has_study(rdb, name: str) -> bool:
    try:
        rdb.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def _finished_trials(rdb, name: str) -> int:
    from optuna.trial import TrialState

    study_id = rdb.get_study_id_from_name(name)
    return len(rdb.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                   TrialState.FAIL)))


def check_study(rdb, url: str, name: str, restoring: bool) -> None:
    """A new study must not land in an old Optuna study of the same name (TPE would learn from its trials); a
    resumed one must find its own. An old one with no finished trial is what a start that never reached Tune's
    first checkpoint leaves behind (nothing to resume, nothing learned): it is deleted."""
    shown = storage.mask_uri(url)
    exists = has_study(rdb, name)
    if exists and not restoring and not _finished_trials(rdb, name):
        import optuna

        optuna.delete_study(study_name=name, storage=rdb)
        exists = False
    if exists and not restoring:
        raise OptunaStorageError(f"an Optuna study named {name!r} already exists in {shown}; choose another --name, "
                                 f"or delete it: optuna delete-study --study-name {name} --storage {shown}")
    if restoring and not exists:
        raise OptunaStorageError(f"study {name!r} keeps its Optuna trials in {shown}, which has no study of that name; "
                                 "resume where that storage is (a SQLite file stays on the disk that wrote it)")


def study_storage(explicit: str | None, workdir: str, name: str, searched: bool, info: dict,
                  restoring: bool) -> tuple[str | None, object]:
    """(URL, opened ``RDBStorage``) of study ``name``'s Optuna study, checked before anything trains and said on
    the terminal. A resume keeps the storage its study started with (``info``: its ``study.json``); (None, None)
    for a space with nothing to search (no TPE) or a study started before studies had a storage."""
    if not searched or (restoring and info and "optuna_storage" not in info):
        return None, None
    url = resolve_storage(explicit, workdir, name)
    if restoring and info.get("optuna_storage"):
        if explicit and url != info["optuna_storage"]:
            raise OptunaStorageError(f"study {name!r} keeps its Optuna trials in "
                                     f"{storage.mask_uri(info['optuna_storage'])}; a resume cannot move them: "
                                     "drop --optuna-storage")
        url = info["optuna_storage"]
    rdb = open_storage(url)
    check_study(rdb, url, name, restoring)
    local = storage.is_remote(workdir) and on_driver_disk(url)
    where = " (on this driver's disk: --workdir is an object store; teams give --optuna-storage postgresql://...)"
    print(f"Optuna study {name!r} in {storage.mask_uri(url)}{where if local else ''}; "
          f"open it with: {dashboard_command(url)}", flush=True)
    return url, rdb
