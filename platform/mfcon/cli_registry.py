"""`mfcon promote | verify | embed`: registry commands, added to the main parser by ``add_commands``.

Each command parses, calls one function of :mod:`mfcon.registry` /
:mod:`mfcon.serving`, and prints a few lines a person reads. The tracking URI
is ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``<workdir>/mlflow.db``.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mfcon.registry import PromotionResult, Scored

# Same values as mfcon.registry (checked by a test); not imported, so `mfcon --help` does not load MLflow.
DEFAULT_MODEL = "mfcon-speaker"
DEFAULT_MODEL_URI = f"models:/{DEFAULT_MODEL}@champion"
SELECTION_METRICS = ("eer", "min_dcf", "min_dcf_005")


def _uri(args: argparse.Namespace) -> str:
    from mfcon.tracking import resolve_tracking_uri

    return resolve_tracking_uri(args.tracking_uri, args.workdir)


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs", help="work dir of the study (its mlflow.db is the default store)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite in --workdir)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``promote``, ``verify`` and ``embed`` on the ``mfcon`` sub-parsers."""
    p = sub.add_parser("promote", help="register a study's best trial; it becomes champion if significantly better")
    p.add_argument("--study", help="study name (its MLflow experiment)")
    p.add_argument("--data", help="prepared data folder: its eval trials rescore challenger and champion")
    _add_store_args(p)
    p.add_argument("--model-name", default=DEFAULT_MODEL)
    p.add_argument("--metric", default="eer", choices=SELECTION_METRICS, help="picks the best trial")
    p.add_argument("--force", action="store_true", help="make it champion even if not significantly better")
    p.add_argument("--rollback", action="store_true", help="champion <- previous instead of promoting")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    p.set_defaults(func=_promote)

    p = sub.add_parser("verify", help="same speaker? score two recordings with a registered model")
    p.add_argument("a_wav")
    p.add_argument("b_wav")
    p.add_argument("--model", default=DEFAULT_MODEL_URI, help="model URI (default: %(default)s)")
    p.add_argument("--threshold", type=float, help="accept when score >= this (default: the version's EER threshold)")
    _add_store_args(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("embed", help="embed a folder or list of audio files into a Parquet file")
    p.add_argument("inputs", help="folder (every wav/flac below it) or a text file with one path per line")
    p.add_argument("--out", required=True, help="output .parquet (utt_id, embedding)")
    p.add_argument("--model", default=DEFAULT_MODEL_URI, help="model URI (default: %(default)s)")
    _add_store_args(p)
    p.set_defaults(func=_embed)


def _promote(args: argparse.Namespace) -> None:
    from mfcon.registry import RegistryError, promote, rollback

    if args.rollback:
        r = rollback(_uri(args), args.model_name)
        prev = f"v{r.previous}" if r.previous else "none"
        print(f"{r.model_name}: champion v{r.champion} (was v{r.rolled_back}, tagged rolled_back); previous: {prev}")
        return
    if not args.study or not args.data:
        raise RegistryError("promote needs --study NAME and --data DIR (or --rollback)")
    result = promote(args.study, _uri(args), model_name=args.model_name, metric=args.metric, data_dir=args.data,
                     force=args.force, n_boot=args.n_boot, seed=args.seed)
    print(format_promotion(result))


def _ci(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"[{low:6.2f}, {high:6.2f}]"


def _row(label: str, version: str, s: Scored) -> str:
    return f"  {label:<11} {version:<8} {s.eer:7.2f}  {_ci(*s.eer_ci)}  {s.threshold:+.4f}"


def format_promotion(r: PromotionResult) -> str:
    """Champion vs challenger EER table with the CIs and the decision."""
    conf = f"{r.delta.confidence if r.delta else 0.95:.0%}"
    lines = [f"study {r.study}: best trial {r.trial.trial_id} (run {r.trial.run_id[:12]}), "
             f"{r.metric} {r.trial.value:.4g} in training",
             f"rescored on {r.n_trials} trials, {r.n_groups} enrollment speakers (cluster bootstrap)", "",
             f"  {'':<11} {'version':<8} {'EER %':>7}  {conf + ' CI':<16}  threshold"]
    if r.champion is not None:
        lines.append(_row("champion", f"v{r.champion_version}", r.champion))
    lines.append(_row("challenger", f"v{r.version}", r.challenger))
    if r.delta is not None:
        lines.append(f"  {'difference':<11} {'':<8} {r.delta.estimate:+7.2f}  {_ci(r.delta.low, r.delta.high)}")
    verdict = (f"PROMOTED: {r.model_name}@champion -> v{r.version}" if r.promoted
               else f"not promoted: {r.model_name}@champion stays v{r.champion_version}")
    lines += ["", f"{verdict} ({r.reason})"]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> None:
    from mfcon.registry import verify

    r = verify(args.a_wav, args.b_wav, model_uri=args.model, threshold=args.threshold, tracking_uri=_uri(args))
    decision = "same speaker (accepted)" if r.accepted else "different speakers (rejected)"
    print(f"score {r.score:+.4f}  threshold {r.threshold:+.4f}  ->  {decision}\nmodel {r.model_uri}")


def _embed(args: argparse.Namespace) -> None:
    from mfcon.registry import pin_model_uri
    from mfcon.serving import embed

    uri = _uri(args)
    pinned, _, _ = pin_model_uri(args.model, uri)
    rows = embed(args.inputs, args.out, model_uri=pinned, tracking_uri=uri, progress=True)
    print(f"wrote {rows} embeddings from {pinned} to {args.out}")
