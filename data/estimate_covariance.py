#!/usr/bin/env python
"""Estimate the covariance C of a text encoder's outputs for Perfusion's gated rank-1 edit.

    python data/estimate_covariance.py --config CFG --ckpt BASE --captions data/captions.txt --out PATH

Streams the captions through the text encoder of CFG (weights from BASE), accumulates
E[e e^T] of the encodings the U-Net's cross-attention receives in float64 over the tokens chosen
by --token_rule, and saves C and C^-1 with metadata (see ldm/covariance.py).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ldm.covariance import (  # noqa: E402
    TOKEN_RULES, CovarianceAccumulator, add_ridge, eigen_report, invert, save_covariance, token_mask,
)

DEFAULT_CAPTIONS = REPO_ROOT / "data" / "captions.txt"
# Without --ckpt the encoder keeps random weights; that is only allowed for test-size encoders.
MAX_RANDOM_PARAMS = 10_000_000
ILL_CONDITIONED = 1e8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="model YAML; its model.params.cond_stage_config is built")
    parser.add_argument("--ckpt", default=None, help="base SD checkpoint (.ckpt/.safetensors) holding cond_stage_model.* weights")
    parser.add_argument("--captions", default=str(DEFAULT_CAPTIONS), help="text file, one caption per line (.gz accepted); blank lines skipped")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--token_rule", choices=TOKEN_RULES, default="all",
                        help="which of the 77 positions count: all = start, words, end and padding (what the cross-attention sees)")
    parser.add_argument("--ridge", type=float, default=0.0, help="add ridge * mean eigenvalue * I to C")
    parser.add_argument("--batch_size", type=int, default=64, help="captions per text-encoder pass")
    parser.add_argument("--max_captions", type=int, default=None, help="use only the first N captions")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights when --ckpt is not given")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.max_captions is not None and args.max_captions < 1:
        parser.error(f"--max_captions must be at least 1, got {args.max_captions}")
    if not (args.ridge >= 0 and math.isfinite(args.ridge)):
        parser.error(f"--ridge must be a finite number >= 0, got {args.ridge}")
    return args


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_captions(path: str | Path, limit: int | None = None) -> Iterator[str]:
    """Non-blank lines of `path`, stripped, streamed (never the whole file in memory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caption file not found" + (" (it is a directory)" if path.is_dir() else ""))
    count = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and count >= limit:
                    return
                text = line.strip()
                if text:
                    count += 1
                    yield text
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (near line {lineno + 1}): {err.reason}") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read captions: {err}") from err


def count_captions(path: str | Path, limit: int | None = None) -> int:
    """Number of captions that `iter_captions` yields; ValueError if there are none."""
    n = sum(1 for _ in iter_captions(path, limit))
    if n == 0:
        raise ValueError(f"{path}: no captions (the file is empty or has only blank lines)")
    return n


def batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_text_encoder(config_path: str, ckpt: str | None, seed: int):
    """The config's cond_stage_model alone, with weights from `ckpt` (random only for tiny encoders)."""
    from ldm.build import ConfigError, load_config
    from ldm.checkpoint import load_into
    from ldm.util import count_params, instantiate_from_config

    config = load_config([config_path])
    cond = config.model.get("params", {}).get("cond_stage_config")
    if cond is None:
        raise ConfigError(f"{config_path}: no model.params.cond_stage_config (the text encoder)")
    torch.manual_seed(seed)
    encoder = instantiate_from_config(cond)
    if ckpt is not None:
        load_into(encoder, ckpt, prefix="cond_stage_model.")
    else:
        n = count_params(encoder)
        if n > MAX_RANDOM_PARAMS:
            raise ValueError(f"--ckpt is required for {config_path}: its text encoder has {n / 1e6:.0f} M parameters "
                             "and random weights would give a meaningless covariance")
        print(f"warning: no --ckpt: using RANDOM weights (seed {seed}) for the test-size text encoder of "
              f"{config_path}; the covariance is only good for tests", file=sys.stderr)
    return encoder.eval()


def accumulate(encoder, captions: Iterator[str], rule: str, batch_size: int, total: int | None = None,
               progress: bool = True) -> tuple[CovarianceAccumulator, str]:
    """Run the encoder over `captions`; return the accumulator and a SHA-256 of the captions used."""
    device = encoder.token_embedding.weight.device
    acc = CovarianceAccumulator(encoder.output_dim, device=device)
    digest = hashlib.sha256()
    eot = encoder.tokenizer.eot_token_id
    with tqdm(total=total, unit="caption", desc="encoding captions", disable=not progress) as bar, torch.inference_mode():
        for batch in batched(captions, batch_size):
            for text in batch:
                digest.update(text.encode("utf-8") + b"\n")
            tokens = encoder.tokenize(batch)
            encodings = encoder.encode_embeddings(tokens, encoder.token_embedding(tokens))
            acc.update(encodings, token_mask(tokens, rule, eot))
            bar.update(len(batch))
    return acc, digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n_captions = count_captions(args.captions, args.max_captions)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r} is not a torch device ({err})") from err
    encoder = build_text_encoder(args.config, args.ckpt, args.seed).to(device)
    fingerprint = encoder.fingerprint()

    start = time.perf_counter()
    acc, captions_sha = accumulate(encoder, iter_captions(args.captions, args.max_captions), args.token_rule,
                                   args.batch_size, total=n_captions)
    seconds = time.perf_counter() - start
    c, ridge_abs = add_ridge(acc.finalize(), args.ridge)
    report = eigen_report(c)
    print(f"captions: {acc.sequences}  tokens counted: {acc.tokens} (rule '{args.token_rule}')  "
          f"dim: {acc.dim}  time: {seconds:.1f} s")
    print(f"eigenvalues: min {report['eig_min']:.4g}  max {report['eig_max']:.4g}  "
          f"condition number {report['condition_number']:.4g}")
    if report["condition_number"] > ILL_CONDITIONED:
        print(f"warning: C is ill-conditioned (> {ILL_CONDITIONED:.0e}); consider --ridge 1e-6 or more captions",
              file=sys.stderr)
    c_inv = invert(c)
    metadata = {
        "text_encoder": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "text_encoder_fingerprint": fingerprint,
        "base_checkpoint": Path(args.ckpt).name if args.ckpt else "none (random weights)",
        "captions": acc.sequences,
        "tokens": acc.tokens,
        "token_rule": args.token_rule,
        "ridge": repr(args.ridge),
        "ridge_absolute": repr(ridge_abs),
        "captions_file": Path(args.captions).name,
        "captions_sha256": captions_sha,
        "eig_min": repr(report["eig_min"]),
        "eig_max": repr(report["eig_max"]),
        "condition_number": repr(report["condition_number"]),
    }
    out = save_covariance(args.out, c, metadata, c_inv=c_inv)
    print(f"saved {out} (text encoder fingerprint {fingerprint})")
    return 0


if __name__ == "__main__":
    import warnings

    from ldm.cli import run_cli

    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)
    run_cli(main)
