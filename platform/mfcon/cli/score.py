"""``mfcon score``: EER and minDCF (with speaker-bootstrap intervals) of trial lists, for any model.

The work is in :mod:`mfcon.evaluation.score_lists`; this module parses, checks
everything a user can get wrong before any model loads, and prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mfcon.cli.common import (
    add_score_norm_options,
    add_store_options,
    check_store_exists,
    positive_int,
    tracking_uri,
)
from mfcon.names import DEFAULT_MODEL_URI


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="EER and minDCF (95%% speaker-bootstrap intervals) of trial lists with a "
                                     "registered model, a logged model or a training checkpoint",
                       description="Score trial lists of a prepared data folder: its own named lists (dev, "
                                   "test, or the names prepare gave: O, E, H, ...; all of them when no LIST is "
                                   "given) or files of '<0|1> <enroll> <test>' lines naming utterance ids of one of its "
                                   "splits. Prints EER and minDCF (p_target 0.01, 0.05) with 95% intervals "
                                   "over enrollment speakers; writes <list>.scores.txt (label enroll test score), "
                                   "<list>.det.png and summary.json to --out. Formulas: docs/evaluation.md.")
    p.add_argument("lists", nargs="*", metavar="LIST",
                   help="a list of the data folder by name (dev, test, or a name given to prepare --test-trials "
                        "NAME=PATH) or a trial-list file; none: every named list of the folder")
    p.add_argument("--lists", dest="list_names", type=_names, default=[], metavar="NAMES",
                   help="comma list of the data folder's lists to score, e.g. O,E (added to any LIST)")
    p.add_argument("--data", required=True, help="folder made by `mfcon prepare` (features of the listed utterances)")
    p.add_argument("--model", default=DEFAULT_MODEL_URI,
                   help="models:/NAME@ALIAS, models:/NAME/N, runs:/RUN_ID/model, or a checkpoint of mfcon train "
                        "(best.pt or last.pt, or its --out folder: best.pt)")
    p.add_argument("--out", default="scores", help="folder for the scores, DET plots and summary.json")
    p.add_argument("--center", choices=("split", "model"), default="split",
                   help="mean subtracted before cosine: the mean embedding of the list's split (as evaluation and "
                        "promotion score), or the mean stored on a registered version (as mfcon verify scores)")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the model runs (auto: cuda when available)")
    p.add_argument("--log-to-run", metavar="RUN_ID",
                   help="also log the metrics (score_<list>_eer, ...) and files (artifacts scores/) to this MLflow "
                        "run of the store given by --workdir/--tracking-uri")
    add_score_norm_options(p)
    add_store_options(p)
    p.set_defaults(func=_score)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _score(args: argparse.Namespace) -> None:
    from mfcon.evaluation.score_lists import (
        ScoreError,
        assign_splits,
        check_model_spec,
        check_run,
        format_results,
        is_mlflow_uri,
        load_scoring_model,
        log_to_run,
        read_lists,
        score_lists,
        write_outputs,
    )

    # Everything a user can get wrong, before a model loads or a file is written.
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ScoreError(f"--out {out}: exists and is not a folder")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ScoreError("--device cuda: no CUDA device is available here; use --device auto or cpu")
    if not Path(args.data).is_dir() and "://" not in args.data:
        raise ScoreError(f"--data {args.data}: no such folder (give the --out folder of mfcon prepare)")
    lists = read_lists(args.data, [*args.lists, *args.list_names])
    assign_splits(args.data, lists)
    needs_store = is_mlflow_uri(args.model) or args.log_to_run
    uri = tracking_uri(args) if needs_store else ""
    if needs_store:
        check_store_exists(uri)
    model_uri, tags = check_model_spec(args.model, uri)
    if args.center == "model" and "score_mean" not in tags:
        raise ScoreError(f"--center model: {model_uri} carries no score_mean tag (only a version registered by "
                         "mfcon promote does); use --center split")
    if args.log_to_run:
        check_run(uri, args.log_to_run)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    model = load_scoring_model(model_uri, uri, tags, device=None if args.device == "auto" else args.device)
    results = score_lists(args.data, lists, model, score_norm=args.score_norm, top_n=args.top_n, center=args.center,
                          n_boot=args.n_boot, seed=args.seed, progress=say)
    files = write_outputs(out, results, model_uri)
    norm = results[0].score_norm if results else args.score_norm
    print(f"model {model_uri}  scoring: {norm}, centred by the {args.center} mean; "
          f"95% intervals over enrollment speakers ({args.n_boot} resamples)")
    print(format_results(results))
    print(f"\nwrote {', '.join(str(p) for name, paths in files.items() if name != 'summary' for p in paths[:1])} "
          f"(label enroll test score), DET plots and {files['summary'][0]}")
    if args.log_to_run:
        log_to_run(uri, args.log_to_run, results, files)
        print(f"logged to MLflow run {args.log_to_run} (metrics score_<list>_*, artifacts scores/)")
    lists = "".join(f"{spec} " for spec in [*args.lists, *args.list_names])
    print(f"next: compare another model on the same lists: mfcon score {lists}--data {args.data} --model OTHER"
          + (f"; or use this one: mfcon verify a.wav b.wav --model {args.model}" if is_mlflow_uri(args.model) else
             "; or run a study and promote its winner to use it with mfcon verify / embed"))
