"""``mfcon make-corpus | prepare``: a demo corpus, and audio to feature shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mfcon.cli.common import non_negative_int, positive_int

if TYPE_CHECKING:
    from mfcon.data.augment import AugmentConfig


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-corpus", help="generate the synthetic multi-speaker demo corpus (espeak-ng voices)")
    p.add_argument("--out", required=True, help="folder for wav/ (VoxCeleb layout), trials.txt and corpus.json; "
                                                "re-running with the same options completes it")
    p.add_argument("--speakers", type=positive_int, default=40, help="speakers in all (at least 3)")
    p.add_argument("--utts", type=positive_int, default=10, help="utterances per speaker (at least 2)")
    p.add_argument("--test-speakers", type=positive_int, default=10,
                   help="speakers held out for trials.txt (at least 2, fewer than --speakers)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="voices, texts and trials (byte-identical files)")
    p.set_defaults(func=_make_corpus)

    p = sub.add_parser("prepare", help="audio -> 80-dim fbank -> Parquet shards + manifest.json")
    p.add_argument("--corpus", required=True, help="VoxCeleb-layout root <speaker>/<video>/<utt>.wav")
    p.add_argument("--test-trials", "--trials", dest="test_trials", required=True, action="append",
                   type=test_list_spec, metavar="[NAME=]PATH",
                   help="held-out test trial list, <0|1> <enroll> <test> per line; read only by replication, "
                        "promotion and reports. Repeat with names for several lists side by side "
                        "(--test-trials O=veri_test2.txt --test-trials E=list_test_all2.txt); a bare PATH is "
                        "the list named 'test'. The speakers of every list are held out of train and dev")
    dev = p.add_mutually_exclusive_group(required=True)
    dev.add_argument("--dev-trials", help="dev trial list (what studies select on), speakers disjoint from test")
    dev.add_argument("--dev-speakers", type=positive_int,
                     help="hold out N training speakers (seeded) and generate the dev trial list over them")
    p.add_argument("--dev-trials-per-utt", type=positive_int, default=3,
                   help="generated dev list: target trials per enrolment utterance, plus as many non-targets")
    p.add_argument("--seed", type=int, default=0, help="shard order and dev speakers")
    p.add_argument("--out", required=True, help="data folder to write (shards, trial lists, manifest.json), or an "
                                                "s3:// / gs:// URI; re-running resumes")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild every shard when --out was prepared with other features or an unreadable manifest")
    p.add_argument("--rows-per-shard", type=positive_int, default=256, help="utterances per Parquet shard")
    p.add_argument("--workers", type=non_negative_int, default=2,
                   help="processes building shards (0: in this process)")
    p.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32",
                   help="how shards store the fbank features: float32 (default), or float16 for compact shards "
                        "(about 0.36x the bytes, zstd + byte-stream-split; training still reads float32); "
                        "recorded in manifest.json")
    add_augment_options(p)
    p.set_defaults(func=_prepare)


def add_augment_options(p: argparse.ArgumentParser) -> None:
    """Train-split augmentation (Kaldi MUSAN/RIR copies, WeSpeaker speed perturbation); off unless asked for."""
    g = p.add_argument_group("augmentation (train split only; dev and test are never augmented)")
    g.add_argument("--augment-copies", type=non_negative_int, default=0, metavar="N",
                   help="augmented copies per training utterance (0 = none), kinds in a seeded rotation")
    g.add_argument("--augment-kinds", type=_names, default=["noise", "music", "babble", "reverb"], metavar="KINDS",
                   help="comma list of noise (SNR 0-15 dB), music (5-15), babble (3-7 speakers, 13-20), reverb "
                        "(default: all four)")
    g.add_argument("--musan", metavar="DIR", help="MUSAN folder: <DIR>/{noise,music,speech}/**/*.wav")
    g.add_argument("--rir", metavar="DIR", help="room impulse responses, **/*.wav (e.g. RIRS_NOISES/simulated_rirs)")
    g.add_argument("--speed-perturb", type=_factors, default=[], metavar="FACTORS",
                   help="comma list, e.g. 0.9,1.1: each factor adds every training speaker again as a new "
                        "speaker <speaker>-sp<factor>")
    g.add_argument("--augment-seed", type=int, help="seed of the copies' kinds, files, offsets and SNRs "
                                                    "(default: --seed)")


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _factors(text: str) -> list[float]:
    try:
        return [float(f) for f in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.9,1.1, got {text!r}") from None


def augment_from_args(args: argparse.Namespace) -> AugmentConfig | None:
    """The AugmentConfig the options ask for, or None when they ask for none (AugmentError names a bad option)."""
    from mfcon.data.augment import AugmentError, augment_config

    if not args.augment_copies:
        given = [flag for flag, value in (("--musan", args.musan), ("--rir", args.rir)) if value]
        if given:
            raise AugmentError(f"{' and '.join(given)} given without --augment-copies N (N >= 1): nothing would use it")
        if not args.speed_perturb:
            return None

    seed = args.seed if args.augment_seed is None else args.augment_seed
    return augment_config("mfcon prepare options", copies=args.augment_copies, kinds=args.augment_kinds,
                          musan_dir=args.musan, rir_dir=args.rir, speed_factors=args.speed_perturb, seed=seed)


class CorpusOptionError(ValueError):
    """make-corpus options that cannot make a corpus; the message names the flags."""


def check_corpus_options(args: argparse.Namespace) -> None:
    """The corpus spec's limits in flag terms, before anything is generated."""
    if args.speakers < 3:
        raise CorpusOptionError(f"--speakers {args.speakers}: a corpus needs at least 3 speakers")
    if args.utts < 2:
        raise CorpusOptionError(f"--utts {args.utts}: each speaker needs at least 2 utterances "
                                "(same-speaker trials pair two of them)")
    if args.test_speakers < 2:
        raise CorpusOptionError(f"--test-speakers {args.test_speakers}: the trial list needs at least 2 speakers")
    if args.test_speakers >= args.speakers:
        raise CorpusOptionError(f"--test-speakers {args.test_speakers} must be fewer than --speakers {args.speakers} "
                                f"(default 10 held out of 40): lower --test-speakers or raise --speakers")


def _make_corpus(args: argparse.Namespace) -> None:
    check_corpus_options(args)
    from mfcon.data.corpus.synthetic import CorpusSpec, make_corpus

    spec = CorpusSpec(n_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=args.test_speakers,
                      seed=args.seed)
    from mfcon.train.local import progress_enabled

    layout = make_corpus(Path(args.out), spec, progress=progress_enabled())
    n_trials = sum(1 for line in layout.trials.read_text().splitlines() if line.strip())
    print(f"corpus: {layout.root} ({args.speakers} speakers x {args.utts} utterances)\n"
          f"trials: {layout.trials} ({n_trials} trials over {args.test_speakers} held-out speakers)")
    dev = max(1, min(8, (args.speakers - args.test_speakers) // 4))
    print(f"next: mfcon prepare --corpus {layout.root} --test-trials {layout.trials} --dev-speakers {dev} "
          f"--out {Path(args.out) / 'shards'}")


def test_list_spec(text: str) -> tuple[str, str]:
    """argparse type of ``--test-trials``: ``NAME=PATH`` -> (NAME, PATH); a bare PATH -> ("test", PATH).

    Text before the first ``=`` with no path separator in it is a name and must be a valid one
    (``a/b=c.txt`` is a path)."""
    from mfcon.data.shards import TEST_LIST, check_list_name

    name, sep, path = text.partition("=")
    if not sep or "/" in name or "\\" in name:
        return TEST_LIST, text
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=PATH with no PATH after '='")
    try:
        return check_list_name(name), path
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def test_lists_of(args: argparse.Namespace) -> dict[str, str]:
    """--test-trials given once or more -> {name: path}; a name given twice is an error naming it."""
    lists: dict[str, str] = {}
    for name, path in args.test_trials:
        if name in lists:
            raise CorpusOptionError(f"--test-trials: the name {name!r} is given twice ({lists[name]} and {path}); "
                                    "name each list once (NAME=PATH; a bare PATH is named 'test')")
        lists[name] = path
    return lists


def _check_prepare_options(args: argparse.Namespace) -> None:
    test_paths = [("--test-trials", path) for path in test_lists_of(args).values()]
    for flag, value in (("--corpus", args.corpus), *test_paths, ("--dev-trials", args.dev_trials)):
        if value is None or "://" in str(value):
            continue
        if not Path(value).exists():
            raise FileNotFoundError(2, f"no such {'folder' if flag == '--corpus' else 'file'} (given as {flag})",
                                    str(value))
    if not Path(args.corpus).is_dir():
        raise NotADirectoryError(20, "not a folder (--corpus takes the root of <speaker>/<video>/<utt>.wav)",
                                 str(args.corpus))


def _prepare(args: argparse.Namespace) -> None:
    _check_prepare_options(args)
    augment = augment_from_args(args)
    from mfcon.data.prepare import prepare_dataset
    from mfcon.train.local import progress_enabled

    kept: list[tuple[str, int, int, int]] = []
    manifest = prepare_dataset(args.corpus, test_lists_of(args), args.out, dev_trials=args.dev_trials,
                               dev_speakers=args.dev_speakers, dev_trials_per_utt=args.dev_trials_per_utt,
                               rows_per_shard=args.rows_per_shard, num_workers=args.workers, seed=args.seed,
                               augment=augment, feature_dtype=args.feature_dtype, overwrite=args.overwrite,
                               trial_report=lambda *counts: kept.append(counts), progress=progress_enabled())
    print(f"prepared {args.out}: manifest.json, {sum(len(s.shards) for s in manifest.splits.values())} shards, "
          f"{', '.join(manifest.trials[s] for s in manifest.trials)}")
    for name, split in manifest.splits.items():
        print(f"{name:5s}: {split.rows} rows, {split.num_speakers} speakers, {len(split.shards)} shards")
    if manifest.feature_dtype != "float32":
        print(f"features stored as {manifest.feature_dtype} (compact shards)")
    if (aug := manifest.augmentation) is not None:
        kinds = f" ({', '.join(aug.kinds)})" if aug.copies else ""
        speeds = f", speed {', '.join(f'{f:g}' for f in aug.speed_factors)} as new speakers" if aug.speed_factors else ""
        print(f"augmented train: {aug.copies} copies per utterance{kinds}{speeds}; "
              f"{len(manifest.speakers)} classes")
    for split, n_kept, n_listed, n_files in kept:
        print(f"{split} trials: kept {n_kept} of {n_listed} ({manifest.trials.get(split, split)})")
    if manifest.skipped:
        print(f"skipped {len(manifest.skipped)} unreadable files (listed in manifest.json under 'skipped'):")
        for item in manifest.skipped[:20]:
            print(f"  {item.reason if item.reason.startswith(item.path) else f'{item.path}: {item.reason}'}")
        if len(manifest.skipped) > 20:
            print(f"  ... and {len(manifest.skipped) - 20} more")
    for split, n_kept, n_listed, n_files in kept:
        if n_kept < n_listed:
            print(f"warning: the {split} trial list lost {n_listed - n_kept} of {n_listed} trials "
                  f"({100 * (n_listed - n_kept) / n_listed:.1f}%) because they name {n_files} skipped "
                  f"file{'s' if n_files != 1 else ''}; its EER is measured on the {n_kept} left "
                  "(fix or replace those files and prepare again to keep them)", file=sys.stderr)
    print(f"next: mfcon train --config configs/tiny.yaml --data {args.out} --out ckpt/   (one model), or "
          f"mfcon study --space search_spaces/demo.yaml --data {args.out}")
    speakers = manifest.splits["train"].num_speakers
    if speakers < 8:
        print(f"      (configs/tiny.yaml batches 8 speakers and the train split has {speakers}: copy it and set "
              f"data.speakers_per_batch to at most {speakers})")
