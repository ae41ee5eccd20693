#!/usr/bin/env python
"""Train a model described by YAML configs with PyTorch Lightning, counted in optimizer steps.

    python main.py --base configs/perfusion_teddy.yaml -t --gpus 0, [key=value ...]
    python main.py --resume logs/2024-01-01T10-00-00_perfusion_teddy -t [lightning.trainer.max_steps=600]

The command lives in ldm/train.py (run directory layout, flags: see --help).
"""
from ldm.cli import run_cli
from ldm.train import main

if __name__ == "__main__":
    run_cli(main)
