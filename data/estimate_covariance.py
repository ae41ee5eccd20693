#!/usr/bin/env python
"""Estimate the covariance C of a text encoder's outputs for Perfusion's gated rank-1 edit.

    python data/estimate_covariance.py --config CFG --ckpt BASE --captions data/captions.txt --out PATH

The command lives in ldm/estimate_covariance.py (see --help).
"""
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import run_cli  # noqa: E402
from ldm.estimate_covariance import main  # noqa: E402

if __name__ == "__main__":
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)
    run_cli(main)
