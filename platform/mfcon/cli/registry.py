"""``mfcon promote``: register a study's challenger; champion when significantly better on test; roll back."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from mfcon.cli.common import add_score_norm_options, add_store_options, positive_int, tracking_uri
from mfcon.names import DEFAULT_MODEL, SELECTION_METRICS

if TYPE_CHECKING:
    from mfcon.promotion.registry import PromotionResult, Scored


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("promote", help="register a study's challenger (its replication's best configuration, else its "
                       "best trial by a dev metric); it becomes champion if significantly better on the test list")
    p.add_argument("--study", help="study name (its MLflow experiment)")
    p.add_argument("--data", help="prepared data folder: its test trials score challenger and champion")
    add_store_options(p)
    p.add_argument("--model-name", default=DEFAULT_MODEL, help="registered model to add the version to")
    p.add_argument("--metric", default=None, choices=SELECTION_METRICS,
                   help="dev metric that picks the best trial or the replica to register (default: the metric "
                        "the study optimised)")
    p.add_argument("--decide-on", metavar="NAME",
                   help="the named test list the gate decides on (default: 'test' when the data folder has it, "
                        "else its first list); every list is scored and reported")
    p.add_argument("--force", action="store_true", help="make it champion even if not significantly better")
    p.add_argument("--rollback", action="store_true", help="champion <- previous instead of promoting")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples")
    add_score_norm_options(p)
    p.set_defaults(func=_promote)


def _promote(args: argparse.Namespace) -> None:
    from mfcon.names import RegistryError

    if not args.rollback and (not args.study or not args.data):
        raise RegistryError("promote needs --study NAME and --data DIR (or --rollback)")
    from mfcon.promotion.registry import promote, rollback

    if args.rollback:
        r = rollback(tracking_uri(args), args.model_name)
        prev = f"v{r.previous}" if r.previous else "none"
        print(f"{r.model_name}: champion v{r.champion} (was v{r.rolled_back}, tagged rolled_back); previous: {prev}")
        return
    result = promote(args.study, tracking_uri(args), model_name=args.model_name, metric=args.metric,
                     data_dir=args.data, force=args.force, n_boot=args.n_boot, seed=args.seed,
                     score_norm=args.score_norm, top_n=args.top_n, decide_on=args.decide_on)
    print(format_promotion(result))
    print(f"next: mfcon score {result.decided_on} --data {args.data} "
          f"--model models:/{result.model_name}/{result.version}   "
          f"(or: mfcon verify a.wav b.wav --model models:/{result.model_name}@champion)")


def _ci(low: float, high: float) -> str:
    return "" if math.isnan(low) else f"[{low:6.2f}, {high:6.2f}]"


def _row(label: str, version: str, s: Scored) -> str:
    return f"  {label:<11} {version:<8} {s.eer:7.2f}  {_ci(*s.eer_ci)}  {s.threshold:+.4f}"


def format_lists(r: PromotionResult) -> str:
    """One row per named test list: challenger and champion EER / minDCF and the difference with its CI."""
    rows = [f"  {'list':<10} {'trials':>7} {'spk':>4}  {'challenger EER %':>16} {'minDCF':>7}  "
            f"{'champion EER %':>14} {'minDCF':>7}  difference"]
    for c in r.lists:
        mark = "*" if c.name == r.decided_on else ""
        champ = (f"{c.champion_eer:14.2f} {c.champion_min_dcf:7.4f}" if c.champion_eer is not None
                 else f"{'-':>14} {'-':>7}")
        diff = f"{c.delta.estimate:+6.2f} {_ci(c.delta.low, c.delta.high)}" if c.delta is not None else "-"
        rows.append(f"  {c.name + mark:<10} {c.n_trials:>7} {c.n_speakers:>4}  {c.challenger_eer:16.2f} "
                    f"{c.challenger_min_dcf:7.4f}  {champ}  {diff}")
    return "\n".join(rows)


def format_promotion(r: PromotionResult) -> str:
    """The evidence, champion vs challenger EER table on the test list with the CIs, and the decision."""
    conf = f"{r.delta.confidence if r.delta else 0.95:.0%}"
    lines = [f"study {r.study}: evidence {r.evidence}: {r.evidence_detail}",
             f"registered run {r.trial.run_id[:12]} ({r.trial.trial_id}), {r.metric} {r.trial.value:.4g} on dev",
             f"scored on {'the test list' if r.decided_on == 'test' else 'test list ' + r.decided_on}: "
             f"{r.n_trials} trials, {r.n_groups} enrollment speakers (cluster bootstrap)", "",
             f"  {'':<11} {'version':<8} {'EER %':>7}  {conf + ' CI':<16}  threshold"]
    if r.champion is not None:
        lines.append(_row("champion", f"v{r.champion_version}", r.champion))
    lines.append(_row("challenger", f"v{r.version}", r.challenger))
    if len(r.seed_eers) > 1:
        eers = ", ".join(f"{e:.2f}" for e in r.seed_eers)
        lines.append(f"  {'seeds':<11} {'':<8} {sum(r.seed_eers) / len(r.seed_eers):7.2f}  mean of {eers}")
    if r.delta is not None:
        what = "seed mean - champion" if len(r.seed_eers) > 1 else "challenger - champion"
        lines.append(f"  {'difference':<11} {'':<8} {r.delta.estimate:+7.2f}  {_ci(r.delta.low, r.delta.high)}  "
                     f"({what})")
    if r.lists:
        lines += ["", f"every test list (the gate decided on {r.decided_on}):", format_lists(r)]
    verdict = (f"PROMOTED: {r.model_name}@champion -> v{r.version}" if r.promoted
               else f"not promoted: {r.model_name}@champion stays v{r.champion_version}")
    lines += ["", f"{verdict} ({r.reason})"]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
