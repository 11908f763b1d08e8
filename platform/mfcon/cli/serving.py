"""``mfcon verify | embed``: use a registered model on recordings."""

from __future__ import annotations

import argparse

from mfcon.cli.common import add_store_options, tracking_uri
from mfcon.names import DEFAULT_MODEL_URI


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="same speaker? score two recordings with a registered model")
    p.add_argument("a_wav")
    p.add_argument("b_wav")
    p.add_argument("--model", default=DEFAULT_MODEL_URI, help="model URI (default: %(default)s)")
    p.add_argument("--threshold", type=float, help="accept when score >= this (default: the version's EER threshold)")
    add_store_options(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("embed", help="embed a folder or list of audio files into a Parquet file")
    p.add_argument("inputs", help="folder (every wav/flac below it) or a text file with one path per line")
    p.add_argument("--out", required=True, help="output .parquet (utt_id, embedding)")
    p.add_argument("--model", default=DEFAULT_MODEL_URI, help="model URI (default: %(default)s)")
    add_store_options(p)
    p.set_defaults(func=_embed)


def _verify(args: argparse.Namespace) -> None:
    from mfcon.serving import verify

    r = verify(args.a_wav, args.b_wav, model_uri=args.model, threshold=args.threshold, tracking_uri=tracking_uri(args))
    decision = "same speaker (accepted)" if r.accepted else "different speakers (rejected)"
    print(f"score {r.score:+.4f}  threshold {r.threshold:+.4f}  ->  {decision}\nmodel {r.model_uri}")


def _embed(args: argparse.Namespace) -> None:
    from mfcon.serving import embed, pin_model_uri

    uri = tracking_uri(args)
    pinned, _, _ = pin_model_uri(args.model, uri)
    rows = embed(args.inputs, args.out, model_uri=pinned, tracking_uri=uri, progress=True)
    print(f"wrote {rows} embeddings from {pinned} to {args.out}")
