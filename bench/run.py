"""Benchmarks, reported as ratios measured in one run (never as timed tests).

1. Feature preparation: utterances/s with 2 workers vs 1 on the same corpus.
2. Study overhead: per-trial start-up (Tune's request -> first training step) vs time
   spent training, read from a study's MLflow store (run the demo first); bench/trial_startup.py
   breaks it down by stage and compares the workers' data readers.

    .venv/bin/python bench/run.py [--speakers 40 --utts 10] [--workdir demo_out/runs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus  # noqa: E402
from mfcon.data.prepare import prepare_dataset  # noqa: E402


def bench_prepare(speakers: int, utts: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        layout = make_corpus(Path(tmp) / "corpus", CorpusSpec(n_speakers=speakers, utts_per_speaker=utts,
                                                              n_test_speakers=max(2, speakers // 4)), progress=False)
        n = speakers * utts
        rates: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeats):
            for workers in (1, 2):
                out = Path(tmp) / f"shards{workers}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                prepare_dataset(layout.root, layout.trials, out, dev_speakers=2, rows_per_shard=32, num_workers=workers,
                                progress=False)
                rates[workers].append(n / (time.perf_counter() - started))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    return {"utterances": n, "utt_per_s_1_worker": round(one, 1), "utt_per_s_2_workers": round(two, 1),
            "speedup_2_vs_1": round(two / one, 2)}


def bench_trial_overhead(workdir: Path) -> dict | None:
    db = workdir / "mlflow.db"
    if not db.exists():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db.resolve()}")
    startup, train = [], []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], "tags.`mfcon.role` = 'trial'"):
            m = run.data.metrics
            if "startup_seconds" in m:
                startup.append(m["startup_seconds"])
                train.append(sum(x.value for x in client.get_metric_history(run.info.run_id, "train_seconds")))
    if not startup:
        return None
    return {"trials": len(startup), "median_startup_s": round(statistics.median(startup), 1),
            "median_train_s": round(statistics.median(train), 1),
            "startup_share": round(sum(startup) / (sum(startup) + sum(train)), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speakers", type=int, default=40)
    p.add_argument("--utts", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default="demo_out/runs")
    args = p.parse_args()
    results = {"prepare": bench_prepare(args.speakers, args.utts, args.repeats),
               "trial_overhead": bench_trial_overhead(Path(args.workdir))}
    print(json.dumps(results, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
