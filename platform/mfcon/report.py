"""A study's summary in one file: inputs, the baseline line, every trial ranked by the study's metric, plots.

Read back from MLflow only (docs/ARCHITECTURE.md, "Study outputs"), so it works for a
finished, interrupted or still-running study and for any tracking store. HTML embeds
the plots as base64 PNGs (one file to mail or attach to a pull request); Markdown
writes the PNGs beside it. The study's own lambda = 0 baseline and noise floor answer
"did the search find anything?"; every dev number is labelled a selection (the best of
N trials), and the replication's verdict on the test list is shown when there is one.
Another study whose experiment name contains ``baseline`` in the same store is shown
for comparison, with the same warning.

>>> path = write_report("sqlite:////abs/runs/mlflow.db", "demo-mfcon", "runs/demo-mfcon/report")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import contextlib
import html
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mfcon.files import atomic_write_bytes
from mfcon.plots import TRIAL_PLOTS, figure_png, study_figures
from mfcon.study.optuna_rebuild import build_optuna_study, load_space
from mfcon.tracking import (
    PLOTS_DIR,
    StudyNotFound,
    StudyRecord,
    TrialRecord,
    load_study,
    no_artifact_progress_bars,
    read_replication,
)

FORMATS = ("html", "md")
PLOT_TITLES = {"optimization_history": "Optimization history", "param_importances": "Parameter importances",
               "slice": "Slices: MFCon weight (lambda), temperature (tau), block selection",
               "det": "Best trial: DET curve", "score_histogram": "Best trial: score distributions",
               "replication": "Replication: test EER per seed, mean, difference to the baseline"}


class ReportError(ValueError):
    """The report cannot be written (unknown study or format); the message says which."""


@dataclass
class ReportData:
    record: StudyRecord
    tracking_uri: str
    plots: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    baselines: list[StudyRecord] = field(default_factory=list)
    generated: str = ""
    replication: dict | None = None  # the latest replication.json (mfcon replicate), if any


def atomic_write(path: Path, data: bytes | str) -> Path:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)
    return path


def find_baselines(client, study_name: str) -> list[StudyRecord]:
    """Other mfcon studies in the store whose name contains ``baseline`` (case-insensitive)."""
    out = []
    for exp in client.search_experiments(filter_string="name ILIKE '%baseline%'"):
        if exp.name == study_name:
            continue
        try:
            out.append(load_study(client, exp.name))
        except StudyNotFound:
            continue  # an experiment that is not an mfcon study
    return sorted(out, key=lambda r: r.name)


def _best_trial_plots(client, record: StudyRecord) -> dict[str, bytes]:
    """The DET curve and score histogram the study logged on its best trial, where it did."""
    return {} if record.best is None else _run_plots(client, record.best.run_id, TRIAL_PLOTS)


def _run_plots(client, run_id: str, wanted) -> dict[str, bytes]:
    """PNG bytes of the run's ``plots/<name>.png`` for each wanted name it has."""
    names = {Path(f.path).name for f in client.list_artifacts(run_id, PLOTS_DIR)}
    out = {}
    with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
        for name in wanted:
            if f"{name}.png" in names:
                out[name] = Path(client.download_artifacts(run_id, f"{PLOTS_DIR}/{name}.png", tmp)).read_bytes()
    return out


def collect(tracking_uri: str, study_name: str) -> ReportData:
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        raise ReportError(f"no MLflow store at {tracking_uri} (wrong --workdir or --tracking-uri?)")
    client = MlflowClient(tracking_uri)
    try:
        record = load_study(client, study_name)
    except StudyNotFound as e:
        raise ReportError(f"{tracking_uri}: {e}") from None
    study = build_optuna_study(record, load_space(record))
    plots = {name: figure_png(fig) for name, fig in study_figures(study).items()}
    plots.update(_best_trial_plots(client, record))
    replication = read_replication(client, study_name)
    if replication is not None:
        plots.update(_run_plots(client, replication["run_id"], ("replication",)))
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ReportData(record, tracking_uri, plots, find_baselines(client, study_name), generated, replication)


def replication_rows(table: dict) -> tuple[list[str], list[list[str]]]:
    """Per configuration: seeds, test EER and minDCF mean +- sd, difference to the baseline with its CI."""
    header = ["config", "lambda / tau / blocks", "seeds", "test eer (%) mean +- sd", "test min_dcf mean +- sd",
              "eer minus baseline (95% CI, paired seeds)"]
    rows = []
    for label, c in table["configs"].items():
        eer, dcf = np.asarray(c["test_eer"]), np.asarray(c["test_min_dcf"])
        sd = (lambda x: float(np.std(x, ddof=1)) if x.size > 1 else 0.0)
        d = c["delta_eer"]
        delta = "baseline" if d is None else f"{d['estimate']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        rows.append([label, config_summary(c.get("params") or {}), ", ".join(map(str, c["seeds"])),
                     f"{eer.mean():.2f} +- {sd(eer):.2f}", f"{dcf.mean():.4f} +- {sd(dcf):.4f}", delta])
    return header, rows


def config_summary(params: dict[str, str]) -> str:
    """lambda / tau / blocks of a replicated configuration, as a person compares them."""
    weight = params.get("loss.mfcon_weight")
    if weight is not None and float(weight) == 0.0:
        return "0 (no MFCon loss)"
    blocks = params.get("loss.mfcon_blocks") or ",".join(
        k.rsplit(".b", 1)[1] for k, v in sorted(params.items()) if re.fullmatch(r"loss\.mfcon_blocks\.b\d+", k)
        and v == "True") or "-"
    return f"{fmt_value(weight)} / {fmt_value(params.get('loss.mfcon_temperature'))} / {blocks}"


# ---------------------------------------------------------------- table content (shared by both formats)

def display_params(record: StudyRecord) -> list[str]:
    """Param columns: per-block booleans ``X.bN`` are folded into the resolved ``X`` ("1,3") when it is logged."""
    keys = sorted({k for t in record.trials for k in t.params})
    return [k for k in keys if not (re.fullmatch(r".+\.b\d+", k) and k.rsplit(".", 1)[0] in keys)]


def fmt_value(value: str | None) -> str:
    if value is None:
        return "-"
    try:
        number = float(value)
    except ValueError:
        return value
    return value if re.fullmatch(r"-?\d+", value) else f"{number:.4g}"


def fmt_eer(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fmt_dcf(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


SELECTION_NOTE = ("Dev values are a selection, not a verdict: the best of a study's trials on the list the search "
                  "optimised. The replication (mfcon replicate) judges on the held-out test list.")
WITHIN_NOISE = "within noise of the best"


def fmt_metric(metric: str, value: float | None) -> str:
    return fmt_eer(value) if metric.endswith("eer") else fmt_dcf(value)


def trial_rows(record: StudyRecord) -> tuple[list[str], list[list[str]]]:
    """Every trial by its best value of the study's metric; the baseline's marked, and the trials the noise floor
    cannot tell from the best."""
    params = [k for k in display_params(record) if k not in ("baseline", "seed")]
    comparison = record.baseline_comparison()
    header = ["rank", "trial", "state", "role", *params, f"best {record.metric}", "dev eer (%) @ best",
              "dev min_dcf @ best", "best epoch / run", "vs best"]
    rows = []
    for rank, t in enumerate(record.ranked(), start=1):
        role = f"baseline (seed {t.seed if t.seed is not None else '-'})" if t.baseline else "search"
        near = WITHIN_NOISE if (not t.baseline and comparison.within_noise_of_best(t.best_value)
                                and t.trial_id != comparison.best_trial) else ""
        if t.trial_id == comparison.best_trial:
            near = "best"
        rows.append([str(rank), t.trial_id, t.state, role, *(fmt_value(t.params.get(k)) for k in params),
                     fmt_metric(record.metric, t.best_value), fmt_eer(t.best_eer), fmt_dcf(t.best_min_dcf),
                     f"{t.best_epoch if t.best_epoch is not None else '-'} / {t.epochs_run}", near])
    return header, rows


def baseline_line(record: StudyRecord) -> str | None:
    """The study's answer to "did the search find anything?" (None for a study without baseline trials)."""
    if not record.baseline_trials:
        return record.tags.get("mfcon.baseline_line")
    return record.baseline_comparison().line()


def info_rows(data: ReportData) -> list[tuple[str, str]]:
    r = data.record
    states = ", ".join(f"{n} {s}" for s, n in sorted(r.states().items())) or "none"
    return [("study", r.name), ("tracking store", data.tracking_uri),
            ("experiment / study run", f"{r.experiment_id} / {r.parent_run_id}"),
            ("code version", r.tags.get("mfcon.code_version", "-")),
            ("data manifest sha256", r.tags.get("mfcon.data_manifest_sha256", "-")),
            ("search space", r.space_file or "-"), ("trials", f"{len(r.trials)} ({states})"),
            ("generated", data.generated)]


def best_rows(best: TrialRecord, metric: str = "dev_eer") -> list[tuple[str, str]]:
    rows = [("trial", best.trial_id), ("run", f"{best.run_name} ({best.run_id})"), ("state", best.state),
            (f"best {metric} (selection: best of the study)", fmt_metric(metric, best.best_value)),
            ("dev eer (%) at that epoch", fmt_eer(best.best_eer)), ("min_dcf at that epoch", fmt_dcf(best.best_min_dcf)),
            ("best epoch / epochs run", f"{best.best_epoch} / {best.epochs_run}")]
    return rows + [(k, fmt_value(v)) for k, v in sorted(best.params.items())]


def baseline_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    ours = data.record.best.best_eer if data.record.best else None
    header = ["study", "trials", "best trial", "best dev eer (%) (best of its trials)", "dev min_dcf @ best",
              f"{data.record.name} minus it (dev eer, selection)"]
    rows = []
    for b in [data.record, *data.baselines]:
        best = b.best
        eer = best.best_eer if best else None
        delta = "-" if (ours is None or eer is None or b is data.record) else f"{ours - eer:+.2f}"
        rows.append([b.name, str(len(b.trials)), best.trial_id if best else "-", fmt_eer(eer),
                     fmt_dcf(best.best_min_dcf if best else None), delta])
    return header, rows


# ---------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f2f2f2}tr.best td{background:#e8f5e9;font-weight:600}pre{background:#f7f7f7;padding:1em;overflow:auto}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}code{font-size:90%}"""


def _html_table(header: list[str], rows: list[list[str]], best_col: int | None = None, best: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cls = ' class="best"' if best is not None and best_col is not None and row[best_col] == best else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_pairs(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table><tbody>{body}</tbody></table>"


def render_html(data: ReportData) -> str:
    r, best = data.record, data.record.best
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>Study {html.escape(r.name)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>Study {html.escape(r.name)}</h1>",
             "<h2>Study</h2>", _html_pairs(info_rows(data))]
    line = baseline_line(r)
    if line:
        parts += ["<h2>Did the search beat its baseline?</h2>", f"<p><strong>{html.escape(line)}</strong></p>"]
    parts += ["<h2>Best trial</h2>", f"<p>{html.escape(SELECTION_NOTE)}</p>",
              _html_pairs(best_rows(best, r.metric)) if best else f"<p>No trial has a {r.metric} yet.</p>"]
    if data.replication:
        parts += ["<h2>Replication: equal compute, held-out test list</h2>",
                  _html_table(*replication_rows(data.replication)),
                  f"<p><strong>{html.escape(data.replication['verdict'])}</strong></p>"]
    if data.baselines:
        parts += ["<h2>Other baseline studies (dev, selection)</h2>", f"<p>{html.escape(SELECTION_NOTE)}</p>",
                  _html_table(*baseline_rows(data))]
    header, rows = trial_rows(r)
    parts += [f"<h2>Trials (by best {html.escape(r.metric)})</h2>",
              _html_table(header, rows, 1, best.trial_id if best else None)]
    parts.append("<h2>Plots</h2>")
    for name, png in data.plots.items():
        title = html.escape(PLOT_TITLES.get(name, name))
        parts.append(f'<figure id="{name}"><figcaption>{title}</figcaption><img alt="{title}" '
                     f'src="data:image/png;base64,{base64.b64encode(png).decode()}"></figure>')
    if r.space_yaml:
        parts += [f"<h2>Search space ({html.escape(r.space_file or '')})</h2>",
                  f"<pre>{html.escape(r.space_yaml)}</pre>"]
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- Markdown

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(data: ReportData, images: dict[str, str]) -> str:
    """``images`` maps plot name -> PNG file name beside the Markdown file."""
    r, best = data.record, data.record.best
    parts = [f"# Study {r.name}", "## Study", _md_table(["", ""], [list(p) for p in info_rows(data)])]
    line = baseline_line(r)
    if line:
        parts += ["## Did the search beat its baseline?", f"**{line}**"]
    parts += ["## Best trial", SELECTION_NOTE,
              _md_table(["", ""], [list(p) for p in best_rows(best, r.metric)]) if best
              else f"No trial has a {r.metric} yet."]
    if data.replication:
        parts += ["## Replication: equal compute, held-out test list", _md_table(*replication_rows(data.replication)),
                  f"**{data.replication['verdict']}**"]
    if data.baselines:
        parts += ["## Other baseline studies (dev, selection)", SELECTION_NOTE, _md_table(*baseline_rows(data))]
    header, rows = trial_rows(r)
    if best:
        rows = [[f"**{c}**" for c in row] if row[1] == best.trial_id else row for row in rows]
    parts += [f"## Trials (by best {r.metric})", _md_table(header, rows), "## Plots"]
    parts += [f"### {PLOT_TITLES.get(name, name)}\n\n![{name}]({file})" for name, file in images.items()]
    if r.space_yaml:
        parts += [f"## Search space ({r.space_file})", f"```yaml\n{r.space_yaml.rstrip()}\n```"]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- entry point

REPORT_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # a report is read-only: seconds, not MLflow's minutes


@contextlib.contextmanager
def _fail_fast_tracking(tracking_uri: str):
    """A server or database that does not answer ends the report in seconds with one line (TrackingUnavailable);
    MLflow's own retries are cut to a short budget while the report reads (unless the environment sets them)."""
    from mfcon.tracking import check_tracking_uri

    if not tracking_uri.startswith(("sqlite:", "file:")) and "://" in tracking_uri:
        check_tracking_uri(tracking_uri, timeout_s=5.0)
    saved = {k: os.environ.get(k) for k in REPORT_HTTP_ENV}
    os.environ.update({k: v for k, v in REPORT_HTTP_ENV.items() if saved[k] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def report_stem(study_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", study_name)


def write_report(tracking_uri: str, study_name: str, out_dir: str | Path, fmt: str = "html") -> Path:
    """Write ``<out_dir>/<study>.html`` (plots inline) or ``<study>.md`` + ``<study>-<plot>.png``; returns the path."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; use one of {FORMATS}")
    with _fail_fast_tracking(tracking_uri):
        data = collect(tracking_uri, study_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = report_stem(study_name)
    if fmt == "html":
        return atomic_write(out / f"{stem}.html", render_html(data))
    images = {}
    for name, png in data.plots.items():  # images first, so the Markdown never points at a missing file
        images[name] = atomic_write(out / f"{stem}-{name}.png", png).name
    return atomic_write(out / f"{stem}.md", render_markdown(data, images))
