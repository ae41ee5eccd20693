#!/usr/bin/env python
"""Estimate the covariance C of a text encoder's outputs for Perfusion's gated rank-1 edit.

    python data/estimate_covariance.py --config CFG --ckpt BASE --captions data/captions.txt --out PATH

The command lives in ldm/perfusion/estimate_covariance.py (see --help).
"""
import sys
import warnings

from ldm.cli import run_cli
from ldm.perfusion.estimate_covariance import main

if __name__ == "__main__":
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)
    run_cli(main)
