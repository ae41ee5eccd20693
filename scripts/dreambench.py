r"""DreamBench for Perfusion: train every subject of the DreamBooth dataset (or any folder of subject
folders), render its 25 prompts x 4 seeds with and without the concept, and score DINO, CLIP-I and
CLIP-T per subject, per kind (object, live) and overall, beside published figures of other methods.

    python scripts/dreambench.py --subjects dreambooth/dataset --config configs/perfusion_custom.yaml \
        --metrics dreambooth --clip_ckpt ckpt/metrics/vit-b-32-openai.bin --dino ckpt/metrics/dino-vits16 \
        --clipseg ckpt/clipseg-rd64-refined --beta_sweep 0.5:0.9:5 --out eval/dreambench
    python scripts/dreambench.py ... --shard 0/4      # one of 4 jobs; then: --merge --out eval/dreambench

Writes OUT/subjects/<subject>.json (a finished subject is skipped when run again), OUT/report.md,
results.json and tradeoff.png; training runs, masks and concept files go under OUT/runs/.
The command lives in ldm/evaluation/dreambench/cli.py (see --help).
"""
from ldm.cli import run_cli
from ldm.evaluation.dreambench.cli import main

if __name__ == "__main__":
    run_cli(main)
