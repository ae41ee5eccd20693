"""The toy-world benchmark: does Perfusion do what the paper claims, measured by the scorer?

    python -m ldm.toy.benchmark --out reports/toy-benchmark            # 38 min on 2 CPU cores
    python -m ldm.toy.benchmark --out /tmp/bench --quick               # smoke version (a minute)

Two regimes, each concept trained with configs/toy/perfusion.yaml (main.py's own training loop):

- few photos of one layout (data/toy/concepts-narrow, the main table; ldm.toy.fewshot): Perfusion
  and the paper's ablations (Fig. 9), each a curve over beta with 95 % intervals;
- layout-covering sets (data/toy/concepts): Perfusion, with trained keys instead of locked ones,
  as textual inversion (the embedding alone) and without the mask.

Every concept is then drawn from a fixed set of prompts never used in training, and the scorer
judges every image:

- concept fidelity: the concept's look (its colour, or pattern and colours) is seen on the object that names it;
- text alignment: every other requested attribute (positions, background, the other object's
  shape and colour) is right.

Per method (the two key-locking modes at sampling included, the superclass word with no concept
as the floor, the look spelled out in words (a combination pretraining never named; for a
solid colour, which has no word, its nearest colour word), and for
reference the whole U-Net fine-tuned on the concept's images, ldm.toy.full_finetune), the
fidelity/alignment curve over beta at tau 0.1 and 0.15, two concepts in one prompt (the default
multi-concept rule; every rule and pair: ldm.toy.pairs), every concept's look untrained (its autoencoder ceiling, and
the base model asked for it in words), concept file size and training time. Writes report.md,
results.json, methods.png, beta_curve.png, samples.png and fig9.png to --out.

The experiment (what is trained, drawn and judged) is ldm/toy/experiment.py, the runner
ldm/toy/runner.py, the report ldm/toy/report.py; this module is the command.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.errors import UserError
from ldm.toy import fewshot, full_finetune
from ldm.toy.experiment import BETA, BETA_GLOBAL, BETAS, SCENE_SPECS
from ldm.toy.fewshot import pct
from ldm.toy.report import _mean
from ldm.toy.runner import run
from ldm.toy.world import COLOUR_CONCEPTS, CONCEPTS
from ldm.util import REPO_ROOT as ROOT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "reports/toy-benchmark"), help="report folder (training runs go to OUT/runs)")
    p.add_argument("--concepts", default=",".join(COLOUR_CONCEPTS),
                   help="comma-separated, of " + ", ".join(CONCEPTS) + " (default: %(default)s)")
    p.add_argument("--train_steps", type=int, default=None, help="default: the config's max_steps")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--sample_steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=2,
                   help="concepts trained side by side, in processes of one thread each (default: %(default)s)")
    p.add_argument("--gate_study", action="store_true",
                   help="also train the covering sets with sim detached at other tokens, with the edit at the concept "
                        "token only and with the leaked gates penalised")
    p.add_argument("--quick", action="store_true",
                   help="smoke version: 2 concepts, 2 training steps, 3 prompts, 1 seed, 2 sampling steps, 2 betas")
    args = p.parse_args(argv)
    for flag in ("train_steps", "seeds", "sample_steps", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be a positive whole number, got {value}")
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    unknown = [c for c in concepts if c not in CONCEPTS]
    if unknown or not concepts:
        raise UserError(f"--concepts {args.concepts!r}: expected names from {', '.join(CONCEPTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    specs, betas, narrow_betas = SCENE_SPECS, BETAS, fewshot.BETAS
    if args.quick:
        concepts, specs, betas, narrow_betas = concepts[:2], SCENE_SPECS[3:6], BETAS[2:4], (BETA_GLOBAL, BETA)
        args.train_steps, args.seeds, args.sample_steps = 2, 1, 2
    results = run(Path(args.out), concepts, args.train_steps, args.seeds, args.sample_steps, specs, betas,
                  finetune_steps=2 if args.quick else full_finetune.STEPS, narrow_betas=narrow_betas,
                  gate_study=args.gate_study, workers=args.workers)
    m = {f"narrow {label}": per for label, per in results["narrow"]["methods"].items()} | results["methods"]
    print(f"report: {Path(args.out) / 'report.md'} ({results['seconds'] / 60:.1f} min); mean fidelity: "
          + ", ".join(f"{label} {pct(_mean(per)['fidelity'])}%" for label, per in m.items()))
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
