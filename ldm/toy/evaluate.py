"""Does the toy base model follow its prompts? Sample scenes' captions, judge the images with the scorer.

    python -m ldm.toy.evaluate --ckpt ckpt/toy/toy-ldm.safetensors            # held-out prompts
    python -m ldm.toy.evaluate --ckpt ... --split train --n 48                  # fresh training-grammar prompts

Prints the fraction of requested attributes (shape, colour, position, background) the scorer
finds correct, per attribute and overall. `--attention PROMPT` prints instead how the U-Net's
cross-attention divides among the prompt's tokens (uniform would be 1/context length each).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from ldm.toy.scorer import Scorer, attribute_accuracy
from ldm.toy.world import Scene, caption, held_out_scenes

ROOT = Path(__file__).resolve().parents[2]


def prompt_accuracy(model, scorer: Scorer, scenes: Sequence[Scene], steps: int = 30, scale: float = 4.0,
                    seed: int = 0, sampler: str = "ddim", batch_size: int = 24) -> dict[str, float]:
    """Render each scene's caption once with `model` and score the images against the scenes."""
    from ldm.sample import generate

    results = []
    for start in range(0, len(scenes), batch_size):
        chunk = list(scenes[start:start + batch_size])
        images = generate(model, [caption(s) for s in chunk], sampler=sampler, steps=steps, scale=scale,
                          height=32, width=32, seed=seed + start)
        results += scorer.score(images, chunk)
    return attribute_accuracy(results)


def attention_shares(model, prompt: str, t: int = 500, seed: int = 0) -> list[tuple[str, float]]:
    """Mean cross-attention probability per token (all layers, heads and query positions) for one
    noisy latent at timestep t; the padding after the prompt is pooled as '<padding>'."""
    encoder = model.cond_stage_model
    ids = encoder.tokenizer.encode(prompt)
    n = len(ids) + 2   # start and end tokens
    if n > encoder.max_length:
        raise ValueError(f"prompt {prompt!r} is {n} tokens with start and end; this text encoder reads {encoder.max_length}")
    mean = torch.stack([p.mean(dim=(0, 1)) for p in model.cross_attention_probs(prompt, t, seed)]).mean(0).tolist()
    words = ["<start>"] + [encoder.tokenizer.decode_token(i).replace("</w>", "") for i in ids] + ["<end>"]
    return list(zip(words, mean[:n])) + [("<padding>", sum(mean[n:]))]


def main(argv=None) -> int:
    from ldm.build import build_model, load_config
    from ldm.toy.dataset import ToyCaptionDataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/toy/ldm.yaml"))
    p.add_argument("--ckpt", default=str(ROOT / "ckpt/toy/toy-ldm.safetensors"))
    p.add_argument("--scorer", default=str(ROOT / "ckpt/toy/scorer.safetensors"))
    p.add_argument("--split", choices=("heldout", "train"), default="heldout")
    p.add_argument("--n", type=int, default=48, help="scenes for --split train")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", metavar="PROMPT", default=None, help="print the attention share of each token")
    args = p.parse_args(argv)
    model = build_model(load_config([args.config]), ckpt=args.ckpt)
    if args.attention:
        shares = attention_shares(model, args.attention, seed=args.seed)
        print(f"cross-attention share per token (t=500, mean over every cross-attention layer, head and "
              f"position; uniform = {100 / model.cond_stage_model.max_length:.1f}% per token):")
        print("  ".join(f"{w} {100 * v:.1f}%" for w, v in shares))
        return 0
    if args.split == "heldout":
        scenes = held_out_scenes()
    else:
        world = ToyCaptionDataset(args.n, seed=1000)
        scenes = [world.scene(i)[1] for i in range(args.n)]
    acc = prompt_accuracy(model, Scorer.load(args.scorer), scenes, args.steps, args.scale, args.seed)
    print(f"{len(scenes)} {args.split} prompts, DDIM {args.steps} steps, guidance {args.scale}")
    print("  ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items() if v == v))   # NaN: not asked for
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from ldm.cli import run_cli

    run_cli(main)
