"""``mfcon score``: score trial lists of a prepared data folder with any model, with intervals; exported embeddings.

What is scored: the data folder's own named lists (``dev``, ``test``, or the
names ``prepare --test-trials NAME=PATH`` gave, e.g. ``O``, ``E``, ``H``; all of
them when none is named) or trial-list files (``<0|1> <enroll> <test>`` per line) whose utterances are utterance ids
of one of the folder's splits (``<speaker>/<video>/<utt>.wav``, as in its
``trials-test.txt``). The model: a registered version (``models:/name@alias``,
``models:/name/N``), a logged model (``runs:/<run>/model``, ``models:/m-...``),
or a checkpoint file of ``mfcon train`` (``best.pt``/``last.pt``, or its folder:
``best.pt`` in it), read with ``weights_only=True``.

How a trial is scored (:class:`mfcon.evaluation.score_norm.TrialScorer`, the
scorer of evaluation, promotion and ``mfcon verify``)::

    s = cos(e - m, t - m)                                  # centred cosine
    s_asnorm = 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)   # with --score-norm asnorm

``e``, ``t`` are the two L2-normalised embeddings; ``m`` is the mean embedding
of the split the list lives in (``center="split"``, what evaluation and
promotion use, so ``mfcon score ... test`` reproduces a promotion's test EER)
or the mean stored on a registered version (``center="model"``, what ``mfcon
verify`` uses); ``mu``/``sd`` are the mean and standard deviation of the
``top_n`` highest centred cosines of each side against the cohort (one unit
mean embedding per training speaker of the data folder, 3 clean utterances
each, centred by ``m``).

Intervals: a cluster bootstrap over enrollment speakers (trials sharing a
speaker are not independent): EER with
:func:`mfcon.evaluation.metrics.bootstrap_eer_difference` against a perfect
scorer (as promotion does), minDCF (p_target 0.01 and 0.05) with
:func:`cluster_bootstrap_min_dcf`; percentile intervals.

Exported embeddings (``mfcon embed``): :func:`scoring_metadata` is what the
Parquet file carries so that :func:`read_embeddings` + :func:`score_pairs`
give exactly ``mfcon verify``'s scores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mfcon.data.corpus.voxceleb import TrialPair, TrialListError, read_trials
from mfcon.evaluation.exported_embeddings import (  # noqa: F401 (mfcon embed's file; docs import it from here)
    SCORE_FORMULA, Embeddings, add_parquet_metadata, read_embeddings, score_pairs, scoring_metadata)
from mfcon.evaluation.intervals import Interval, cluster_bootstrap_min_dcf, eer_interval, enrollment_speakers
from mfcon.evaluation.metrics import equal_error_rate, min_dcf
from mfcon.evaluation.score_norm import DEFAULT_TOP_N, SCORE_NORMS, TrialScorer, speaker_cohort

NAMED_LISTS = ("dev", "test")  # the lists every data folder had before named test lists; see Manifest.trials
CENTERS = ("split", "model")
P_TARGETS = (0.01, 0.05)


class ScoreError(ValueError):
    """A trial list, model, data folder or option of ``mfcon score`` cannot be used; the message says which."""


# ---------------------------------------------------------------- the lists

@dataclass
class TrialList:
    name: str  # dev, test, another named list of the folder, or the file's stem (made unique)
    source: str  # "<data>/trials-test.txt" or the file given
    trials: list[TrialPair]
    split: str = ""  # the data folder's split holding its utterances


def _list_name(spec: str, taken: set[str], named: Sequence[str] = NAMED_LISTS) -> str:
    base = spec if spec in named else re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec).name.removesuffix(".txt"))
    name, n = base or "list", 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def read_lists(data_dir: str | Path, specs: Sequence[str] = ()) -> list[TrialList]:
    """The data folder's named lists (``dev``, ``test``, ``O``, ...; every one when ``specs`` is empty) or
    trial-list files -> parsed lists (errors name file and line). A named list is checked against the sha256
    its manifest records."""
    from mfcon.data.shards import list_split, read_manifest, verified_trials_path

    manifest = read_manifest(data_dir)
    named = list(manifest.trials)
    out, taken = [], set()
    for spec in specs or named:
        if spec in named:
            source = verified_trials_path(data_dir, spec, manifest)
            out.append(TrialList(_list_name(spec, taken, named), source, read_trials(source), split=list_split(spec)))
            continue
        path = Path(spec)
        if not path.exists():
            raise ScoreError(f"{spec}: no such trial list (give a file of '<0|1> <enroll> <test>' lines, "
                             f"or one of {', '.join(named)} for the data folder's own lists)")
        if path.is_dir():
            raise ScoreError(f"{spec}: is a folder, not a trial list file")
        out.append(TrialList(_list_name(spec, taken), str(path), read_trials(path)))
    for tl in out:
        labels = {t.label for t in tl.trials}
        if len(labels) == 1:
            raise ScoreError(f"{tl.source}: every trial has label {labels.pop()}; an EER needs targets (1) and "
                             "non-targets (0)")
    return out


def _split_ids(data_dir: str | Path, split: str) -> set[str]:
    from mfcon.data.shards import read_shard_table, shard_paths

    return {u for path in shard_paths(data_dir, split)
            for u in read_shard_table(path, ["utt_id"]).column("utt_id").to_pylist()}


def assign_splits(data_dir: str | Path, lists: list[TrialList]) -> None:
    """Each file's split: the first of test, dev, train holding every utterance it names; else the first
    utterance in none of them, with its line."""
    cache: dict[str, set[str]] = {}
    for tl in lists:
        if tl.split:
            continue
        needed = {u for t in tl.trials for u in (t.enroll, t.test)}
        for split in ("test", "dev", "train"):
            ids = cache.setdefault(split, _split_ids(data_dir, split))
            if needed <= ids:
                tl.split = split
                break
        else:
            best = max(("test", "dev", "train"), key=lambda s: len(needed & cache[s]))
            missing = next(u for t in tl.trials for u in (t.enroll, t.test) if u not in cache[best])
            line = _line_of(tl.source, missing)
            elsewhere = [s for s in ("test", "dev", "train") if missing in cache[s]]
            if elsewhere:
                raise ScoreError(f"{tl.source}:{line}: utterance {missing!r} is in the {elsewhere[0]} split, while "
                                 f"{len(needed & cache[best])} of the list's utterances are in the {best} split; "
                                 "a list scores utterances of one split (its mean embedding centres the scores)")
            raise ScoreError(f"{tl.source}:{line}: utterance {missing!r} is not in the data folder {data_dir} "
                             f"(its {best} split has {len(needed & cache[best])} of the list's {len(needed)} "
                             "utterances); a list names utterance ids of one prepared split, "
                             "<speaker>/<video>/<utt>.wav as in its trials-test.txt")


def _line_of(path: str, utt: str) -> int:
    try:
        for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if utt in line.split():
                return n
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- the model

@dataclass
class ScoringModel:
    """Features (T, F) -> (N, E) L2-normalised embeddings, and where the model came from."""

    uri: str  # pinned registry URI, the MLflow URI, or the checkpoint path
    embed: Callable[[Sequence[np.ndarray]], np.ndarray]
    feature_config: Any | None  # FeatureConfig the model expects, when it says (MLflow models)
    mean: np.ndarray | None = None  # score_mean of a registered version
    tags: dict[str, str] = field(default_factory=dict)


def is_mlflow_uri(model: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", model)) and not re.match(r"^[A-Za-z]:[\\/]", model)


def checkpoint_file(model: str) -> Path:
    """A checkpoint path: the file, or ``best.pt`` in a folder of ``mfcon train``."""
    path = Path(model)
    if path.is_dir():
        if (path / "best.pt").is_file():
            return path / "best.pt"
        raise ScoreError(f"{model}: folder has no best.pt (give a checkpoint file of mfcon train, or a model URI "
                         "such as models:/mfcon-speaker@champion)")
    if not path.is_file():
        raise ScoreError(f"{model}: no such checkpoint file or model URI (models:/NAME@ALIAS, models:/NAME/N, "
                         "runs:/RUN_ID/model, or a best.pt of mfcon train)")
    return path


def check_model_spec(model: str, tracking_uri: str) -> tuple[str, dict[str, str]]:
    """Before anything heavy: a local checkpoint exists, or an MLflow model's store answers and a registry
    URI names a version. Returns (the model, pinned when it is a registry URI; the version's tags)."""
    if not is_mlflow_uri(model):
        return str(checkpoint_file(model)), {}
    from mfcon.serving import open_registry, pin_model_uri

    open_registry(tracking_uri)
    pinned, _, tags = pin_model_uri(model, tracking_uri)
    return pinned, tags


def load_scoring_model(model: str, tracking_uri: str, tags: dict[str, str] | None = None,
                       device: str | None = None) -> ScoringModel:
    """A checked model spec (:func:`check_model_spec`) loaded for embedding features."""
    import torch

    if is_mlflow_uri(model):
        from mlflow.exceptions import MlflowException

        from mfcon.serving import embedder_of, load_embedder

        try:
            embedder = embedder_of(load_embedder(model, tracking_uri, device=device))
        except MlflowException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ScoreError(f"{model}: cannot load the model from {tracking_uri} ({first})") from None
        tags = tags or {}
        mean = np.asarray(json.loads(tags["score_mean"]), dtype=np.float32) if "score_mean" in tags else None
        return ScoringModel(model, embedder.embed_features, embedder.feature_config, mean, tags)

    from mfcon.config import ModelConfig
    from mfcon.evaluation.scoring import extract_embeddings
    from mfcon.models.mfa_conformer import build_model
    from mfcon.train.checkpoint import load_checkpoint

    state = load_checkpoint(model)
    if not {"model", "model_config"} <= set(state):
        raise ScoreError(f"{model}: a torch file, but not an mfcon model checkpoint (no 'model'/'model_config' "
                         "entries); give best.pt or last.pt of mfcon train")
    net = build_model(ModelConfig(**state["model_config"]))
    net.load_state_dict(state["model"])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.eval().to(dev)
    need = net.min_frames()

    def embed(features: Sequence[np.ndarray]) -> np.ndarray:
        short = [i for i, f in enumerate(features) if len(f) < need]
        if short:
            raise ScoreError(f"{len(short)} utterances are shorter than the model's minimum of {need} frames")
        return extract_embeddings(net, list(features), dev)

    return ScoringModel(model, embed, None)


# ---------------------------------------------------------------- scoring

@dataclass
class ListResult:
    name: str
    source: str
    split: str
    trials: list[TrialPair]
    scores: np.ndarray
    labels: np.ndarray
    eer: Interval  # percent
    eer_threshold: float
    min_dcf: dict[float, Interval]  # p_target -> interval
    n_speakers: int  # enrollment speakers (bootstrap units)
    score_norm: str
    center: str

    def summary(self) -> dict[str, Any]:
        return {"list": self.name, "source": self.source, "split": self.split, "trials": len(self.trials),
                "targets": int(self.labels.sum()), "enrollment_speakers": self.n_speakers,
                "score_norm": self.score_norm, "center": self.center,
                "eer_percent": self.eer.estimate, "eer_ci95": [self.eer.low, self.eer.high],
                "eer_threshold": self.eer_threshold,
                **{f"min_dcf_{p:g}": v.estimate for p, v in self.min_dcf.items()},
                **{f"min_dcf_{p:g}_ci95": [v.low, v.high] for p, v in self.min_dcf.items()}}


def score_lists(data_dir: str | Path, lists: list[TrialList], model: ScoringModel, *, score_norm: str = "mean",
                top_n: int = DEFAULT_TOP_N, center: str = "split", n_boot: int = 1000, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> list[ListResult]:
    """Embed each needed split once, score every list as :class:`TrialScorer` does, metrics with intervals."""
    from mfcon.data.local import read_cohort
    from mfcon.data.shards import load_split, read_manifest

    if score_norm not in SCORE_NORMS:
        raise ScoreError(f"--score-norm must be one of {SCORE_NORMS}, got {score_norm!r}")
    if center not in CENTERS:
        raise ScoreError(f"--center must be one of {CENTERS}, got {center!r}")
    if center == "model" and model.mean is None:
        raise ScoreError(f"--center model: {model.uri} carries no score_mean (only a promoted registry version "
                         "does); use --center split")
    manifest = read_manifest(data_dir)
    if model.feature_config is not None and model.feature_config != manifest.feature_config:
        raise ScoreError(f"{data_dir}: features were prepared with {manifest.feature_config}, the model expects "
                         f"{model.feature_config}; prepare the data with the model's feature config")
    say = progress or (lambda _msg: None)
    embedded: dict[str, tuple[dict[str, int], np.ndarray]] = {}
    for split in dict.fromkeys(tl.split for tl in lists):
        arrays = load_split(data_dir, split, manifest)
        say(f"embedding the {split} split: {len(arrays.utt_ids)} utterances")
        embedded[split] = ({u: i for i, u in enumerate(arrays.utt_ids)}, model.embed(arrays.features))
    cohort = None
    if score_norm == "asnorm":
        cohort_set = read_cohort(data_dir)
        say(f"embedding the AS-norm cohort: {len(set(cohort_set.speakers))} training speakers")
        cohort = speaker_cohort(model.embed(cohort_set.features), cohort_set.speakers)
    results = []
    for tl in lists:
        index, emb = embedded[tl.split]
        mean = model.mean if center == "model" else emb.mean(axis=0)
        scorer = TrialScorer(mean, cohort, top_n)
        a = emb[[index[t.enroll] for t in tl.trials]]
        b = emb[[index[t.test] for t in tl.trials]]
        scores = scorer.score(a, b)
        labels = np.array([t.label for t in tl.trials], dtype=np.int64)
        groups = enrollment_speakers(tl.trials)
        say(f"bootstrapping {tl.name}: {n_boot} resamples of {len(set(groups))} enrollment speakers")
        results.append(ListResult(
            tl.name, tl.source, tl.split, tl.trials, scores, labels,
            eer_interval(scores, labels, groups, n_boot, seed=seed), float(equal_error_rate(scores, labels)[1]),
            {p: cluster_bootstrap_min_dcf(scores, labels, groups, p, n_boot, seed=seed) for p in P_TARGETS},
            len(set(groups)), "mean" if cohort is None else f"asnorm(top_n={top_n})", center))
    return results


# ---------------------------------------------------------------- outputs

def write_outputs(out_dir: Path, results: list[ListResult], model_uri: str) -> dict[str, list[Path]]:
    """``<list>.scores.txt`` (label enroll test score), ``<list>.det.png``, and ``summary.json``; written
    atomically. Returns list name -> its files."""
    from mfcon.files import atomic_write_bytes, atomic_write_text
    from mfcon.plots import det_plot, figure_png

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {}
    for r in results:
        lines = [f"{t.label} {t.enroll} {t.test} {s:.6f}" for t, s in zip(r.trials, r.scores)]
        txt, png = out_dir / f"{r.name}.scores.txt", out_dir / f"{r.name}.det.png"
        atomic_write_text(txt, "\n".join(lines) + "\n")
        atomic_write_bytes(png, figure_png(det_plot(r.scores, r.labels, title=f"{r.name}: DET ({model_uri})")))
        files[r.name] = [txt, png]
    summary = out_dir / "summary.json"
    atomic_write_text(summary, json.dumps({"model": model_uri, "lists": [r.summary() for r in results]},
                                          indent=1) + "\n")
    files["summary"] = [summary]
    return files


def metric_prefix(name: str) -> str:
    return "score_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def check_run(tracking_uri: str, run_id: str) -> None:
    """``--log-to-run``: the store answers and the run exists (checked before anything is scored)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mfcon.serving import open_registry

    open_registry(tracking_uri)
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        raise ScoreError(f"--log-to-run {run_id}: no such run in {tracking_uri}") from None


def log_to_run(tracking_uri: str, run_id: str, results: list[ListResult], files: dict[str, list[Path]]) -> None:
    """Metrics ``score_<list>_eer`` (+ ``_low``/``_high``), ``score_<list>_min_dcf`` / ``_min_dcf_005``, and the
    files under the run's ``scores/`` artifacts."""
    from mlflow.tracking import MlflowClient

    from mfcon.tracking import no_artifact_progress_bars

    client = MlflowClient(tracking_uri)
    for r in results:
        prefix = metric_prefix(r.name)
        values = {f"{prefix}_eer": r.eer.estimate, f"{prefix}_eer_low": r.eer.low, f"{prefix}_eer_high": r.eer.high,
                  f"{prefix}_min_dcf": r.min_dcf[0.01].estimate, f"{prefix}_min_dcf_005": r.min_dcf[0.05].estimate}
        for key, value in values.items():
            client.log_metric(run_id, key, float(value))
    with no_artifact_progress_bars():
        for paths in files.values():
            for path in paths:
                client.log_artifact(run_id, str(path), artifact_path="scores")


def format_results(results: list[ListResult]) -> str:
    head = (f"{'list':<12} {'split':<5} {'trials':>7} {'spk':>4}  {'EER %':>6} {'95% CI':<15}  "
            f"{'minDCF.01':>9} {'95% CI':<14}  {'minDCF.05':>9} {'95% CI':<14}")
    rows = [head]
    for r in results:
        d1, d5 = r.min_dcf[0.01], r.min_dcf[0.05]
        rows.append(f"{r.name:<12} {r.split:<5} {len(r.trials):>7} {r.n_speakers:>4}  {r.eer.estimate:6.2f} "
                    f"[{r.eer.low:5.2f}, {r.eer.high:5.2f}]  {d1.estimate:9.4f} [{d1.low:.3f}, {d1.high:.3f}]  "
                    f"{d5.estimate:9.4f} [{d5.low:.3f}, {d5.high:.3f}]")
    return "\n".join(rows)


__all__ = ["CENTERS", "NAMED_LISTS", "Embeddings", "Interval", "ListResult", "ScoreError", "ScoringModel",
           "TrialList", "TrialListError", "add_parquet_metadata", "assign_splits", "check_model_spec", "check_run",
           "cluster_bootstrap_min_dcf", "eer_interval", "enrollment_speakers", "format_results", "is_mlflow_uri",
           "load_scoring_model",
           "log_to_run", "read_embeddings", "read_lists", "score_lists", "score_pairs", "scoring_metadata",
           "write_outputs"]
