#!/usr/bin/env python
"""Zero-shot soft masks of a concept's images with CLIPSeg, for Perfusion's masked loss.

    python data/soft_segment.py --image_dir DIR --super_class WORD [--model_weight ckpt/clipseg-rd64-refined]

The command lives in clipseg/soft_segment.py (see --help).
"""
import sys
import warnings

from clipseg.soft_segment import main
from ldm.cli import run_cli

if __name__ == "__main__":
    warnings.showwarning = lambda message, *_args, **_kw: print(f"warning: {message}", file=sys.stderr)
    run_cli(main)
