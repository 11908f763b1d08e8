"""Recipe parity: does training-data augmentation, SpecAugment or AS-norm change test EER here?

One command, one run. It generates the demo corpus (``pipelines/demo.py``'s spec, seeded), banks in the
MUSAN and RIRS_NOISES layouts (coloured noise, tone-sequence music, babble from the corpus's TRAINING
speakers only, exponentially decaying room impulse responses), prepares the shards twice (plain, and with
Kaldi-style augmented copies), trains the demo study's base configuration (``search_spaces/demo.yaml``, no
search) with ``train_local`` for every seed of four recipes, and scores each run's best checkpoint (by dev EER)
on the held-out TEST list with mean-subtracted cosine and with AS-norm:

    (a) plain        (b) augmented        (c) plain + SpecAugment        (d) augmented + SpecAugment

Equal compute: augmented shards hold ``1 + copies`` rows per training utterance, so an augmented run trains
``epochs / (1 + copies)`` epochs: every recipe takes the same number of optimizer steps on the same batch size.
The table goes to stdout and to ``--doc`` (docs/recipe_parity.md) with the machine, versions and command.

    .venv/bin/python bench/recipe_parity.py --workdir /tmp/recipe_parity [--quick] [--seeds 3] [--epochs 3]

Finished runs are kept in ``--workdir`` (their ``score.json``) and reused when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))  # run from a checkout without `pip install`

from mfcon.config import ModelConfig, TrainConfig, apply_overrides
from mfcon.data.augment import KINDS, AugmentConfig
from mfcon.data.corpus.noise_banks import SR, coloured_noise, decaying_rir, tone_sequence, write_wav
from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus
from mfcon.data.corpus.voxceleb import list_utterances
from mfcon.data.local import read_eval_set
from mfcon.data.prepare import prepare_dataset
from mfcon.models.mfa_conformer import build_model
from mfcon.evaluation.scoring import EvalSet, evaluate
from mfcon.study.spaces import load_search_space
from mfcon.train.checkpoint import BEST_FILE, load_checkpoint
from mfcon.train.local import train_local

SPACE = REPO / "search_spaces" / "demo.yaml"
SPEC_AUGMENT_PROB = 0.6  # WeSpeaker's, with its default mask counts and widths (SpecAugmentConfig)
RECIPES = {  # name -> (augmented shards, SpecAugment)
    "a plain": (False, False),
    "b augmented": (True, False),
    "c plain+specaug": (False, True),
    "d augmented+specaug": (True, True),
}
SCORINGS = ("mean", "asnorm")
SIZING = (  # measured once, before the full run, on the machine the table was made on
    "Measured first: one plain run at the demo's full size (48 speakers x 10 utterances, 28 training speakers, "
    "17 steps per epoch) took 151 s for ONE epoch plus 15 s to score, on the shared 2-core machine (load "
    "average 12-15 from other engineers' tests, this process at `nice -n 5`, `torch.set_num_threads(2)`), "
    "i.e. about 9 s per optimizer step. 12 runs (4 recipes x 3 seeds) at even 2 epochs would take over an "
    "hour, so the corpus keeps the demo's speakers and splits but 3 utterances per speaker (84 training rows, "
    "5 steps per plain epoch): 2 plain epochs = 1 augmented epoch with 1 copy = 10 steps per run, about "
    "1.5-2 minutes per run including dev evaluation and test scoring. That is far too little training for a "
    "converged model; the numbers compare recipes at an equal, tiny budget."
)


# ---------------------------------------------------------------- banks in MUSAN / RIRS_NOISES layout

def write_banks(base: Path, babble_speech: list[Path], seed: int = 0) -> tuple[Path, Path]:
    """(musan, rir) folders. Babble is copied speech of training speakers only, so no dev/test voice leaks in."""
    rng = np.random.default_rng(seed)
    musan, rirs = base / "musan", base / "RIRS_NOISES" / "simulated_rirs"
    for i, exponent in enumerate((0.0, 1.0, 2.0)):  # white, pink, brown
        write_wav(musan / f"noise/free-sound/noise-{i:04d}.wav", coloured_noise(rng, 4 * SR, exponent))
    for i in range(4):
        write_wav(musan / f"music/fma/tones-{i:04d}.wav", tone_sequence(rng, 6.0))
    for i, path in enumerate(babble_speech):
        target = musan / f"speech/librivox/speech-librivox-{i:04d}.wav"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    for i, rt60 in enumerate((0.2, 0.3, 0.4, 0.6, 0.8)):
        write_wav(rirs / f"smallroom/Room001/Room001-{i + 1:05d}.wav", decaying_rir(rng, rt60, delay=40 + 10 * i))
    return musan, rirs


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class Prepared:
    plain: Path
    augmented: Path
    train_speakers: int
    dev_speakers: int
    test_speakers: int
    babble_files: int


def prepare_both(work: Path, spec: CorpusSpec, dev_speakers: int, copies: int) -> Prepared:
    """Corpus -> plain shards -> banks (babble from the plain manifest's training speakers) -> augmented shards."""
    layout = make_corpus(work / "corpus", spec)
    plain = work / "shards-plain"
    manifest = prepare_dataset(layout.root, layout.trials, plain, dev_speakers=dev_speakers, rows_per_shard=64,
                               num_workers=2)
    train = set(manifest.speakers)
    utts = list_utterances(layout.root)
    babble = [u.path for u in utts if u.speaker in train][::3]  # every 3rd training utterance: varied voices
    musan, rir = write_banks(work / "banks", babble)
    augment = AugmentConfig(copies=copies, kinds=list(KINDS), musan_dir=str(musan), rir_dir=str(rir), seed=0)
    augmented = work / "shards-augmented"
    aug_manifest = prepare_dataset(layout.root, layout.trials, augmented, dev_speakers=dev_speakers,
                                   rows_per_shard=64, num_workers=2, augment=augment)
    if set(aug_manifest.speakers) != train:
        raise RuntimeError(f"{augmented}: training speakers differ from {plain}'s; the comparison would be unfair")
    test = json.loads(layout.info.read_text())["test_speakers"]
    return Prepared(plain, augmented, len(train), manifest.dev_protocol.speakers, len(test), len(babble))


def first_build_seconds(record: Path, seconds: float) -> float:
    """Seconds the data took when first built: a rerun reuses corpus and shards, and must not report its own 5 s."""
    if not record.exists():
        record.write_text(json.dumps({"seconds": seconds}))
    return float(json.loads(record.read_text())["seconds"])


# ---------------------------------------------------------------- training and scoring

def recipe_config(base: TrainConfig, epochs: int, seed: int, spec_augment: bool) -> TrainConfig:
    overrides = {"epochs": epochs, "seed": seed, "device": "cpu"}
    if spec_augment:
        overrides["data.spec_augment.prob"] = SPEC_AUGMENT_PROB
    return apply_overrides(base, overrides, "recipe parity")


def score_best(run_dir: Path, eval_sets: dict[str, EvalSet]) -> dict[str, dict[str, float]]:
    """Test EER (%) and minDCF (p=0.01) of the run's best checkpoint, per scoring."""
    state = load_checkpoint(run_dir / BEST_FILE)
    model = build_model(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    out = {}
    for name, eval_set in eval_sets.items():
        result = evaluate(model, eval_set, "cpu")
        out[name] = {"eer": 100.0 * result.eer, "min_dcf": result.min_dcf_01}
    return {"best_epoch": int(state["epoch"]), **out}


def run_one(run_dir: Path, cfg: TrainConfig, data: Path, eval_sets: dict[str, EvalSet]) -> dict:
    """Train (or reuse a finished run) and score; the score file marks a finished run."""
    done = run_dir / "score.json"
    if done.exists():
        return json.loads(done.read_text())
    started = time.perf_counter()
    train_local(cfg, data, run_dir, resume=True, echo=False)
    train_s = time.perf_counter() - started
    score = score_best(run_dir, eval_sets) | {"train_seconds": train_s,
                                              "score_seconds": time.perf_counter() - started - train_s}
    done.write_text(json.dumps(score, indent=1))
    return score


# ---------------------------------------------------------------- the table

def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table_rows(results: dict[str, list[dict]]) -> list[str]:
    """config x scoring -> test EER mean +- sd over seeds, minDCF mean, paired EER difference to (a)+mean."""
    ref = [r["mean"]["eer"] for r in results["a plain"]]
    header = ("| recipe | scoring | seeds | test EER % (mean ± sd) | test minDCF (mean) | Δ EER vs (a)+mean, paired "
              "(mean ± sd) | per-seed EER % |")
    lines = [header,
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for recipe, runs in results.items():
        for scoring in SCORINGS:
            eers = [r[scoring]["eer"] for r in runs]
            dcf = statistics.fmean(r[scoring]["min_dcf"] for r in runs)
            m, sd = _mean_sd(eers)
            if recipe == "a plain" and scoring == "mean":
                delta = "reference"
            else:
                dm, dsd = _mean_sd([e - b for e, b in zip(eers, ref)])
                delta = f"{dm:+.2f} ± {dsd:.2f}"
            seeds = ", ".join(f"{e:.2f}" for e in eers)
            lines.append(f"| {recipe} | {scoring} | {len(runs)} | {m:.2f} ± {sd:.2f} | {dcf:.3f} | {delta} | {seeds} |")
    return lines


def machine_lines() -> list[str]:
    import mfcon

    return [(f"- machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
            f"{os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}"),
            (f"- python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"mfcon {getattr(mfcon, '__version__', 'checkout')}"),
            f"- date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, code {code_version()}"]


def code_version() -> str:
    """git HEAD, and how many files under platform/ differed from it (a shared checkout is edited while we run)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], check=False, cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "platform").splitlines()
    return f"git {git('rev-parse', '--short', 'HEAD') or 'unknown'}" + (
        f" + uncommitted changes in {len(dirty)} file(s) under platform/" if dirty else "")


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="corpus, banks, shards and runs go here (reused if present)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="epochs over plain data; augmented runs take epochs/(1+copies)")
    p.add_argument("--copies", type=int, default=1, help="augmented copies per training utterance")
    p.add_argument("--speakers", type=int, default=48, help="corpus speakers (the demo's 48)")
    p.add_argument("--utts", type=int, default=3, help="utterances per speaker (the demo has 10; 3 fits the time budget)")
    p.add_argument("--doc", default=str(REPO / "docs" / "recipe_parity.md"), help="Markdown report ('' for none)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch each, no doc written")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/recipe_parity.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(2)
    if args.quick:
        args.seeds, args.epochs, args.copies, args.doc = 1, 1, args.copies, ""
    started = time.perf_counter()
    work = Path(args.workdir).resolve()
    print("\n".join(machine_lines()), flush=True)
    spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=max(4, args.speakers // 4))
    dev_speakers = max(2, args.speakers // 6)  # as pipelines/demo.py
    print(f"[data] corpus {spec.n_speakers} speakers x {spec.utts_per_speaker} utts, {spec.n_test_speakers} test, "
          f"{dev_speakers} dev; augmented copies={args.copies} of kinds {','.join(KINDS)}", flush=True)
    data = prepare_both(work, spec, dev_speakers, args.copies)
    prep_s = first_build_seconds(work / "data_seconds.json", time.perf_counter() - started)
    top_n = min(300, data.train_speakers)
    eval_sets = {"mean": read_eval_set(data.plain, "test"),
                 "asnorm": read_eval_set(data.plain, "test", "asnorm", top_n)}
    print(f"[data] ready in {prep_s:.0f}s: {data.train_speakers} train / {data.dev_speakers} dev / "
          f"{data.test_speakers} test speakers, {len(eval_sets['mean'].trials)} test trials, babble from "
          f"{data.babble_files} training utterances, AS-norm top_n={top_n}", flush=True)
    base = load_search_space(SPACE).base_config()
    aug_epochs = max(1, round(args.epochs / (1 + args.copies)))
    results: dict[str, list[dict]] = {}
    for seed in range(args.seeds):  # seed-major: every finished seed is a complete paired comparison
        for recipe, (augmented, spec_aug) in RECIPES.items():
            epochs = aug_epochs if augmented else args.epochs
            cfg = recipe_config(base, epochs, seed, spec_aug)
            run_dir = work / ("runs-quick" if args.quick else "runs") / f"{recipe.replace(' ', '_')}-e{epochs}-s{seed}"
            score = run_one(run_dir, cfg, data.augmented if augmented else data.plain, eval_sets)
            results.setdefault(recipe, []).append(score)
            print(f"[train] {recipe:20s} seed {seed} epochs {epochs}: best epoch {score['best_epoch']}, "
                  f"test EER {score['mean']['eer']:.2f}% (mean) {score['asnorm']['eer']:.2f}% (asnorm); "
                  f"train {score['train_seconds']:.0f}s, score {score['score_seconds']:.0f}s; "
                  f"elapsed {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        if args.doc:  # a partial table survives an interrupted run
            write_doc(Path(args.doc), table_rows(results), args, data, top_n, aug_epochs,
                      time.perf_counter() - started, prep_s, command, results)
    total = time.perf_counter() - started
    rows = table_rows(results)
    print("\n".join(rows))
    print(f"wall time {total / 60:.1f} min (data {prep_s / 60:.1f} min)")
    if args.doc:
        write_doc(Path(args.doc), rows, args, data, top_n, aug_epochs, total, prep_s, command, results)
        print(f"wrote {args.doc}")
    return 0


def write_doc(path: Path, rows: list[str], args: argparse.Namespace, data: Prepared, top_n: int, aug_epochs: int,
              total: float, prep_s: float, command: str, results: dict[str, list[dict]]) -> None:
    run_s = [r["train_seconds"] + r["score_seconds"] for runs in results.values() for r in runs]
    n_trials = len(read_eval_set(data.plain, "test").trials)
    text = "\n".join([
        "# Recipe parity: augmentation, SpecAugment and AS-norm on the demo corpus (measured)",
        "",
        f"Command: `{command}`",
        "",
        *machine_lines(),
        (f"- time: data (corpus, banks, both shard sets, first build) {prep_s / 60:.1f} min; training + scoring "
         f"{sum(run_s) / 60:.1f} min summed over {len(run_s)} runs ({min(run_s):.0f}-{max(run_s):.0f} s each); "
         f"this invocation {total / 60:.1f} min (finished runs are reused from --workdir)"),
        "",
        "## Setup",
        (f"- Corpus: `pipelines/demo.py`'s speaker layout ({args.speakers} synthetic espeak-ng speakers, "
         f"{data.test_speakers} test speakers, {data.dev_speakers} held-out dev speakers, {data.train_speakers} "
         f"training speakers, seed 0) with {args.utts} utterances per speaker instead of the demo's 10 (see "
         f"Sizing): the test list has {n_trials} trials."),
        (f"- Augmented shards: {args.copies} augmented copy(ies) per training utterance (`AugmentConfig(copies="
         f"{args.copies}, kinds=[noise, music, babble, reverb])`, Kaldi SNRs, no speed perturbation). MUSAN layout: "
         "noise = white/pink/brown noise, music = tone sequences, babble = "
         f"{data.babble_files} utterances of TRAINING speakers only (never dev or test voices); RIRS_NOISES layout: "
         "exponentially decaying noise behind a direct-path spike (RT60 0.2-0.8 s). Dev and test splits are "
         "identical to the plain shards'; test scoring reads the plain shards for every recipe."),
        (f"- Model and training: `search_spaces/demo.yaml`'s `base` (tiny MFA-Conformer, AAM-softmax + MFCon "
         f"λ=0.1, P x K = 8 x 2 crops of 1.5 s, AdamW, cosine), no search, `train_local` on the CPU, "
         f"{args.epochs} epochs on plain shards and {aug_epochs} on augmented shards (which hold {1 + args.copies}x "
         f"the training rows), so every recipe takes the same number of optimizer steps; seeds 0..{args.seeds - 1} "
         "(weights, batches, crops, masks); the checkpoint with the best dev EER is scored."),
        (f"- SpecAugment: `data.spec_augment.prob={SPEC_AUGMENT_PROB}` with WeSpeaker's defaults (1 time mask "
         "<= 10 frames, 1 frequency band <= 8 bins)."),
        (f"- Scoring on the TEST list: mean-subtracted cosine (`mean`) and AS-norm (`asnorm`; cohort = one mean "
         f"embedding per training speaker, {data.train_speakers} speakers, top_n = {top_n} = min(300, cohort), so "
         "here AS-norm uses every cohort speaker)."),
        "",
        "## Sizing",
        SIZING,
        "",
        "## Result",
        "",
        *rows,
        "",
        "Δ is paired by seed: each seed's EER minus the same seed's (a) plain + mean-cosine EER.",
        "",
        "## Reading it",
        ("On a synthetic corpus with this few test speakers, and this few training steps, the seed-to-seed "
        "spread is of the same size as most differences between recipes: a difference whose paired ± sd "
        "interval includes 0 is noise, not evidence that a recipe helps or hurts. The table shows the wiring "
        "works end to end (augmented prepare, SpecAugment in training, AS-norm in scoring), not that the recipe "
        "effects reported on VoxCeleb reproduce here."),
        "",
    ])
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
