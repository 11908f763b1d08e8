"""Human-readable study output for the terminal."""

from __future__ import annotations

from mfcon.study.runner import StudySummary


def print_summary(summary: StudySummary) -> None:
    states = ", ".join(f"{n} {state}" for state, n in sorted(summary.states.items()))
    print(f"\nstudy {summary.study}: {summary.num_trials} trials ({states})")
    if summary.best_trial is not None and summary.best_metric is not None:
        print(f"best trial {summary.best_trial}: {summary.metric} {summary.best_metric:.3f}"
              + ("%" if summary.metric == "eer" else ""))
        for key, value in sorted(summary.best_params.items()):
            print(f"  {key} = {value}")
    uri = summary.tracking_uri
    if uri.startswith("sqlite:"):
        print(f"\nopen the MLflow UI:  mlflow ui --backend-store-uri {uri}")
    else:
        print(f"\ntrials are in MLflow at {uri}")
