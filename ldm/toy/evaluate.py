"""Does the toy base model follow its prompts? Sample scenes' captions, judge the images with the scorer.

    python -m ldm.toy.evaluate --ckpt ckpt/toy/toy-ldm.safetensors            # held-out prompts
    python -m ldm.toy.evaluate --ckpt ... --split train --n 48                  # fresh training-grammar prompts

Prints the fraction of requested attributes (shape, colour, position, background) the scorer
finds correct, per attribute and overall. `--attention PROMPT` prints instead how the U-Net's
cross-attention divides among the prompt's tokens (uniform would be 1/context length each) and,
for a one-object caption of the grammar, how much more each token attends inside the object's
mask than outside it (`localization`; the noun should be well above 1).
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np
import torch

from ldm.errors import UserError
from ldm.toy.drawing import render
from ldm.toy.scorer import Scorer, attribute_accuracy
from ldm.toy.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene, SceneObject, caption, held_out_scenes
from ldm.util import REPO_ROOT as ROOT


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
        raise UserError(f"prompt {prompt!r} is {n} tokens with start and end; this text encoder reads {encoder.max_length}")
    mean = torch.stack([p.mean(dim=(0, 1)) for p in model.cross_attention_probs(prompt, t, seed)]).mean(0).tolist()
    words = ["<start>"] + [encoder.tokenizer.decode_token(i).replace("</w>", "") for i in ids] + ["<end>"]
    return list(zip(words, mean[:n])) + [("<padding>", sum(mean[n:]))]


def scene_for_caption(prompt: str) -> Scene | None:
    """The one-object scene whose caption is `prompt` (an unnamed colour drawn white, an unnamed
    background black), or None if no one-object caption of the grammar reads so."""
    for shape in SHAPES:
        for colour in (None, *COLOURS):
            for position in (None, *POSITIONS):
                for background in (None, *BACKGROUNDS):
                    request = Scene((SceneObject(shape, colour, position),), background)
                    if caption(request) == prompt:
                        return Scene((SceneObject(shape, colour or "white", position or "centre"),),
                                     background or "black")
    return None


@torch.no_grad()
def localization(model, scene: Scene, prompt: str | None = None, t: int = 500, seed: int = 0) -> list[float]:
    """Per token of `prompt` (default: the scene's caption): its cross-attention inside the first
    object's mask divided by its attention outside, averaged over layers and heads, with the U-Net
    looking at the scene's own render noised to timestep t (as in training)."""
    import torch.nn.functional as F

    image, masks = render(scene)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    mask = torch.from_numpy(masks[0].astype("float32") / 255)[None, None]
    g = torch.Generator().manual_seed(seed)
    z = model.encode_first_stage(pixels.to(model.device), sample=False)
    noise = torch.randn(z.shape, generator=g).to(z.device)
    x_t = model.q_sample(z, torch.tensor([t], device=z.device), noise)
    probs = [p.mean(0) for p in model.cross_attention_probs(prompt or caption(scene), t, x_t=x_t)]   # (h*w, tokens)
    inside, outside = 0.0, 0.0
    for p in probs:
        side = int(round(p.shape[0] ** 0.5))
        m = F.interpolate(mask, size=(side, side), mode="area").flatten().to(p.device)[:, None]
        inside = inside + (p * m).sum(0) / m.sum()
        outside = outside + (p * (1 - m)).sum(0) / (1 - m).sum()
    return (inside / outside.clamp_min(1e-12)).tolist()


def noun_localization(model, scenes: Sequence[Scene], t: int = 500) -> float:
    """Mean over one-object scenes (and layers and heads) of the noun's attention inside its object's
    mask, divided by the same mean outside it."""
    tokenizer = model.cond_stage_model.tokenizer
    ratios = []
    for k, scene in enumerate(s for s in scenes if len(s.objects) == 1):
        text = caption(scene)
        tokens = tokenizer([text])[0].tolist()
        noun = tokens.index(tokenizer.encode(scene.objects[0].shape)[0])
        ratios.append(localization(model, scene, text, t, seed=k)[noun])
    return sum(ratios) / len(ratios)


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
        scene = scene_for_caption(args.attention)
        if scene is not None:
            ratios = localization(model, scene, args.attention, seed=args.seed)
            print("localization per token (attention inside the object's mask / outside, the render noised to t=500):")
            print("  ".join(f"{w} {r:.2f}x" for (w, _), r in zip(shares[:-1], ratios)))
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
    from ldm.cli import run_cli

    run_cli(main)
