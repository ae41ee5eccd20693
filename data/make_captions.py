#!/usr/bin/env python
"""Generate the default caption set for data/estimate_covariance.py (deterministic given --seed).

    python data/make_captions.py [--n 24000] [--seed 0] [--out data/captions.txt]

The command lives in ldm/data/make_captions.py (see --help).
"""
from ldm.cli import run_cli
from ldm.data.make_captions import main

if __name__ == "__main__":
    run_cli(main)
