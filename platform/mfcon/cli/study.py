"""``mfcon study | report``: run a hyperparameter study, summarise one; the terminal summary printer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from mfcon.cli.common import add_score_norm_options, add_store_options, tracking_uri

if TYPE_CHECKING:
    from mfcon.study.runner import StudySummary


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="hyperparameter study: Ray Tune + Optuna + ASHA, tracked in MLflow")
    p.add_argument("--space", help="search_spaces/*.yaml")
    p.add_argument("--data", help="folder made by `mfcon prepare`")
    p.add_argument("--name", type=study_name, help="study name (default: the space's name)")
    p.add_argument("--num-samples", type=int, help="trials to run (default: the space's budget.num_samples)")
    p.add_argument("--address", help="Ray cluster address, e.g. auto (default: a private local Ray)")
    add_store_options(p)
    p.add_argument("--optuna-storage", metavar="URL",
                   help="database for the study's Optuna (TPE) trials, what optuna-dashboard opens (default: "
                        "$MFCON_OPTUNA_STORAGE, else sqlite <workdir>/optuna.db; with an object-store --workdir, "
                        "a file on this machine); teams: postgresql://user@host:5432/optuna")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p.set_defaults(func=_study)

    p = sub.add_parser("replicate", help="equal compute: a study's top configurations and the lambda=0 baseline, "
                                         "retrained with several seeds, scored on the held-out test list")
    p.add_argument("--study", required=True, type=study_name, help="a finished study (its name under --workdir)")
    p.add_argument("--top-k", type=int, default=1, help="how many of the study's best configurations (by dev)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per configuration (the same seeds for every "
                                                       "configuration, so the verdict pairs them)")
    p.add_argument("--replication-seed", type=int, default=0,
                   help="draws the training seeds, never one a study trial used (a re-run must give the same)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CI")
    p.add_argument("--decide-on", metavar="NAME",
                   help="the named test list the verdict is decided on (default: 'test' when the data folder has "
                        "it, else its first list); every list is scored and reported")
    p.add_argument("--address", help="Ray cluster address, e.g. auto (default: a private local Ray)")
    add_store_options(p)
    add_score_norm_options(p)
    p.set_defaults(func=_replicate)

    p = sub.add_parser("report", help="study summary (trials by eer, best trial, plots) as HTML or Markdown")
    p.add_argument("--study", required=True, type=study_name, help="study name (its MLflow experiment)")
    add_store_options(p)
    p.add_argument("--out", help="output folder (default: <workdir>/<study>/report, or ./<study>-report when --workdir is a URI)")
    p.add_argument("--format", choices=("html", "md"), default="html",
                   help="html: one file with the plots inline; md: Markdown with the plots as PNG files beside it")
    p.set_defaults(func=_report)


def study_name(text: str) -> str:
    """argparse type of ``--name`` / ``--study``: one safe folder name (``mfcon.names.check_study_name``)."""
    from mfcon.names import StudyNameError, check_study_name

    try:
        return check_study_name(text, "study name")
    except StudyNameError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _study(args: argparse.Namespace) -> None:
    from mfcon.study.runner import run_study

    summary = run_study(args.space, args.data, workdir=args.workdir, num_samples=args.num_samples,
                        address=args.address, tracking_uri=args.tracking_uri, resume=args.resume,
                        study_name=args.name, optuna_storage=args.optuna_storage)
    print_summary(summary)


def _replicate(args: argparse.Namespace) -> None:
    from mfcon.study.replicate import replicate_study

    result = replicate_study(args.study, workdir=args.workdir, top_k=args.top_k, seeds=args.seeds,
                             tracking_uri=args.tracking_uri, address=args.address, n_boot=args.n_boot,
                             score_norm=args.score_norm, top_n=args.top_n,
                             replication_seed=args.replication_seed, decide_on=args.decide_on)
    print("\n" + result.summary())


def print_summary(summary: StudySummary) -> None:
    """A finished study for the terminal: trial states, the best trial and its parameters, where MLflow and the
    Optuna study are."""
    from mfcon.study.trial_table import trial_table

    states = ", ".join(f"{n} {state}" for state, n in sorted(summary.states.items()))
    print(f"\nstudy {summary.study}: {summary.num_trials} trials ({states})")
    rows = getattr(summary, "trials", None)
    if rows:
        print("\n".join(trial_table(rows, summary.metric)))
    if summary.best_trial is not None and summary.best_metric is not None:
        print(f"best trial {summary.best_trial}: {summary.metric} {summary.best_metric:.3f}"
              + ("%" if summary.metric.endswith("eer") else ""))
        for key, value in sorted(summary.best_params.items()):
            print(f"  {key} = {value}")
    if summary.baseline_line:
        print(summary.baseline_line)
    from mfcon.storage import mask_uri

    uri = mask_uri(summary.tracking_uri)  # never a password on the terminal
    if uri.startswith("sqlite:"):
        print(f"\nopen the MLflow UI:  mlflow ui --backend-store-uri {uri}")
    else:
        print(f"\ntrials are in MLflow at {uri}")
    optuna = getattr(summary, "optuna_storage", None)
    if optuna:
        print(f"next: TPE's view of the trials (states, params, history):  optuna-dashboard {mask_uri(optuna)}")


def _report(args: argparse.Namespace) -> None:
    from mfcon.report import write_report

    if args.out:
        out = Path(args.out)
    elif "://" in args.workdir:  # a study kept in an object store: the report is for reading here
        out = Path(f"{args.study}-report")
    else:
        out = Path(args.workdir) / args.study / "report"
    path = write_report(tracking_uri(args), args.study, out, fmt=args.format)
    print(f"report for study {args.study}: {path.resolve()}")
