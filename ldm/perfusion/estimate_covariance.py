"""Estimate the covariance C of a text encoder's outputs for Perfusion's gated rank-1 edit.

    python data/estimate_covariance.py --config CFG --ckpt BASE --captions data/captions.txt --out PATH

Streams the captions through the text encoder of CFG (weights from BASE), accumulates
E[e e^T] of the encodings the U-Net's cross-attention receives in float64 over the tokens chosen
by --token_rule, and saves C and C^-1 with metadata (see ldm/perfusion/covariance.py).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ldm.cli import parse_device
from ldm.errors import UserError
from ldm.perfusion.covariance import (DEFAULT_RIDGE, TOKEN_RULES, accumulate, add_ridge, count_captions, eigen_report,
                                      invert, is_covariance_file, save_covariance)
from ldm.util import REPO_ROOT

DEFAULT_CAPTIONS = REPO_ROOT / "data" / "captions.txt"
# Without --ckpt the encoder keeps random weights; that is only allowed for test-size encoders.
MAX_RANDOM_PARAMS = 10_000_000
ILL_CONDITIONED = 1e8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="model YAML; its model.params.cond_stage_config is built")
    parser.add_argument("--ckpt", default=None,
                        help="base SD checkpoint (.ckpt/.safetensors, or a diffusers folder) holding the text encoder")
    parser.add_argument("--captions", default=str(DEFAULT_CAPTIONS),
                        help="text file, one caption per line (.gz accepted); blank lines skipped")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--token_rule", choices=TOKEN_RULES, default="all",
                        help="which of the 77 positions count; all = start, words, end and padding, "
                             "everything the cross-attention sees")
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                        help="add ridge * mean eigenvalue * I to C; the default bounds the condition number by d * 1e6")
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


def build_text_encoder(config_path: str, ckpt: str | None, seed: int):
    """The config's cond_stage_model alone, with weights from `ckpt` (random only for tiny encoders)."""
    from ldm.build import ConfigError, load_config
    from ldm.checkpoint import load_into
    from ldm.util import count_params, instantiate_from_config

    config = load_config([config_path])
    cond = config.model.get("params", {}).get("cond_stage_config")
    if cond is None:
        raise ConfigError(f"{config_path}: no model.params.cond_stage_config (the text encoder)")
    if ckpt is None:
        with torch.device("meta"):  # count the parameters without allocating them
            n = count_params(instantiate_from_config(cond))
        if n > MAX_RANDOM_PARAMS:
            raise UserError(f"--ckpt is required for {config_path}: its text encoder has {n / 1e6:.0f} M parameters "
                             "and random weights would give a meaningless covariance")
        print(f"warning: no --ckpt: using RANDOM weights (seed {seed}) for the test-size text encoder of "
              f"{config_path}; the covariance is only good for tests", file=sys.stderr)
    torch.manual_seed(seed)
    encoder = instantiate_from_config(cond)
    if ckpt is not None:
        load_into(encoder, ckpt, prefix="cond_stage_model.")
    return encoder.eval()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.is_dir() or (out.parent.exists() and not out.parent.is_dir()):   # checked before the long work
        raise UserError(f"--out {out}: expected a file path (e.g. ckpt/covariance-sd-v1.safetensors), "
                        f"{'it is a folder' if out.is_dir() else f'{out.parent} is not a folder'}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be a whole number in [0, 2^63), got {args.seed}")
    if out.exists() and not is_covariance_file(out):   # a covariance may be replaced, nothing else
        raise UserError(f"--out {out}: exists and is not a covariance file; it would be replaced (choose another "
                        "path, or delete it first)")
    captions = args.captions
    source = Path(captions)
    if source.exists() and not source.is_file() and not source.is_dir():   # a pipe (/dev/stdin): read it once
        with open(source, encoding="utf-8") as f:
            captions = [line.strip() for line in f if line.strip()][:args.max_captions]
        if not captions:
            raise UserError(f"--captions {source}: no captions came through it")
        n_captions = len(captions)
    else:
        n_captions = count_captions(captions, args.max_captions)
    device = parse_device(args.device)
    encoder = build_text_encoder(args.config, args.ckpt, args.seed).to(device)
    fingerprint = encoder.fingerprint()

    start = time.perf_counter()
    acc, captions_sha = accumulate(encoder, captions, args.max_captions, args.token_rule, args.batch_size,
                                   progress=True, total=n_captions)
    seconds = time.perf_counter() - start
    c, ridge_abs = add_ridge(acc.finalize(), args.ridge)
    report = eigen_report(c)
    print(f"captions: {acc.sequences}  tokens counted: {acc.tokens} (rule '{args.token_rule}')  "
          f"dim: {acc.dim}  time: {seconds:.1f} s")
    print(f"eigenvalues: min {report['eig_min']:.4g}  max {report['eig_max']:.4g}  "
          f"condition number {report['condition_number']:.4g}")
    c_inv = invert(c)
    if report["condition_number"] > ILL_CONDITIONED:
        print(f"warning: C is ill-conditioned (condition number {report['condition_number']:.3g}); a larger --ridge "
              "(e.g. 1e-4) or more captions make C^-1 better behaved", file=sys.stderr)
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

