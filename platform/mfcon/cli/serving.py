"""``mfcon verify | embed | export``: use a registered model on recordings, or take it elsewhere."""

from __future__ import annotations

import argparse
from pathlib import Path

from mfcon.cli.common import add_store_options, check_store_exists, tracking_uri
from mfcon.names import DEFAULT_MODEL_URI


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="same speaker? score two recordings with a registered model")
    p.add_argument("a_wav", help="enrollment recording (wav/flac; resampled to 16 kHz, stereo averaged)")
    p.add_argument("b_wav", help="test recording")
    p.add_argument("--model", default=DEFAULT_MODEL_URI, help="model URI (default: %(default)s)")
    p.add_argument("--threshold", type=float, help="accept when score >= this (default: the version's EER threshold)")
    add_store_options(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("embed", help="embed a folder or list of audio files into a Parquet file",
                       description="Embed audio files into a Parquet file (utt_id, embedding: L2-normalised). "
                                   "Its metadata carries how mfcon verify scores two of them with this version: "
                                   "mfcon.score_mean m and, for a version promoted with AS-norm, mfcon.score_norm="
                                   "asnorm, mfcon.score_top_n and mfcon.score_cohort. score = cos(e - m, t - m); "
                                   "AS-norm: 0.5 * ((score - mu_e) / sd_e + (score - mu_t) / sd_t) over the top_n "
                                   "highest cos(x - m, c - m) of each side against the cohort rows c "
                                   "(docs/evaluation.md; mfcon.evaluation.score_lists.read_embeddings).")
    p.add_argument("inputs", help="folder (every wav/flac below it) or a text file with one path per line")
    p.add_argument("--out", required=True, help="output .parquet (utt_id, embedding; scoring recipe in its metadata)")
    p.add_argument("--model", default=DEFAULT_MODEL_URI, help="model URI (default: %(default)s)")
    add_store_options(p)
    p.set_defaults(func=_embed)

    p = sub.add_parser("export", help="a model as TorchScript (fbank features in, embedding out), checked on "
                                      "export to give the model's embeddings",
                       description="Export a model as a TorchScript file: torch.jit.load(FILE)(feats) maps fbank "
                                   "features (B, T, n_mels) float32, every frame real, to (B, E) L2-normalised "
                                   "embeddings, without mfcon or MLflow. The model is loaded as mfcon verify loads "
                                   "it (checksums, weights only); the export is loaded back and must give the "
                                   "model's embeddings on random inputs of several lengths (atol 1e-5, rtol 1e-4), "
                                   "else nothing is written. ONNX is not offered (docs/evaluation.md).")
    p.add_argument("--model", default=DEFAULT_MODEL_URI,
                   help="models:/NAME@ALIAS, models:/NAME/N (or NAME@ALIAS, NAME/N), runs:/RUN_ID/model, or a "
                        "checkpoint of mfcon train (best.pt or last.pt, or its --out folder: best.pt)")
    p.add_argument("--format", choices=("torchscript",), default="torchscript", help="file format")
    p.add_argument("--out", required=True, help="file to write (e.g. speaker.pt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    add_store_options(p)
    p.set_defaults(func=_export)


def _check_store(args: argparse.Namespace) -> None:
    check_store_exists(tracking_uri(args))


def _verify(args: argparse.Namespace) -> None:
    for label, path in (("first recording", args.a_wav), ("second recording", args.b_wav)):
        if not Path(path).is_file():
            raise FileNotFoundError(2, f"no such audio file (the {label})", path)
    _check_store(args)
    from mfcon.serving import verify

    r = verify(args.a_wav, args.b_wav, model_uri=args.model, threshold=args.threshold, tracking_uri=tracking_uri(args))
    decision = "same speaker (accepted)" if r.accepted else "different speakers (rejected)"
    print(f"score {r.score:+.4f}  threshold {r.threshold:+.4f}  ->  {decision}\nmodel {r.model_uri}")


def _embed(args: argparse.Namespace) -> None:
    from mfcon.evaluation.score_lists import ScoreError

    out = Path(args.out)
    if out.is_dir():
        raise ScoreError(f"--out {out}: is a folder; give the .parquet file to write")
    if not Path(args.inputs).exists():
        raise FileNotFoundError(2, "no such folder or list file (the inputs to embed)", args.inputs)
    _check_store(args)
    from mfcon.evaluation.score_lists import add_parquet_metadata, scoring_metadata
    from mfcon.serving import embed, list_audio_inputs, pin_model_uri
    from mfcon.serving.verify import load_cohort

    list_audio_inputs(args.inputs)  # an empty folder or a bad list: said before the model loads
    uri = tracking_uri(args)
    pinned, _, tags = pin_model_uri(args.model, uri)
    cohort = load_cohort(tags, uri, pinned)
    from mfcon.train.local import progress_enabled

    rows = embed(args.inputs, out, model_uri=pinned, tracking_uri=uri, progress=progress_enabled())
    recipe = scoring_metadata(tags, cohort)
    add_parquet_metadata(out, recipe)
    how = "AS-norm cohort and top_n, " if cohort is not None else ""
    mean = "score_mean, " if "mfcon.score_mean" in recipe else "no score_mean (not a promoted version), "
    print(f"wrote {rows} embeddings from {pinned} to {out}\n"
          f"its metadata holds {mean}{how}the formula: scores from it equal mfcon verify's (docs/evaluation.md)\n"
          f"next: score pairs with mfcon.evaluation.score_lists.read_embeddings({str(out)!r}) + score_pairs, "
          "or a trial list with mfcon score")


def _export(args: argparse.Namespace) -> None:
    from mfcon.serving.export import ExportError, model_uri_of

    out = Path(args.out)
    if out.is_dir():
        raise ExportError(f"--out {out}: is a folder; give the file to write (e.g. {out / 'speaker.pt'})")
    from mfcon.evaluation.score_lists import is_mlflow_uri

    model = model_uri_of(args.model)
    uri = tracking_uri(args) if is_mlflow_uri(model) else ""
    if uri:
        check_store_exists(uri)
    from mfcon.serving.export import export_torchscript, load_for_export

    net, feature_config, source = load_for_export(model, uri)
    r = export_torchscript(net, out, feature_config, source=source, seed=args.seed)
    print(f"exported {r.source} to {r.path} (TorchScript, {r.path.stat().st_size / 1e6:.1f} MB)\n"
          f"checked: the same embeddings as the model on {len(r.checked_frames)} random inputs of "
          f"{', '.join(map(str, r.checked_frames))} frames (max |difference| {r.max_abs_diff:.1e})\n"
          f"input:  fbank (B, T, {r.n_mels}) float32, every frame real, T >= {r.min_frames}"
          + (" (mfcon's FeatureConfig is in the file's mfcon.json)" if feature_config is not None else "") + "\n"
          f"output: (B, {r.embed_dim}) float32, L2-normalised\n"
          f"load:   emb = torch.jit.load(\"{r.path}\")(feats)")
