"""Pretrain the toy's text encoder on captions alone, before it is frozen for the U-Net.

Stable Diffusion's text encoder was pretrained (contrastively, by CLIP) and stays frozen while
the U-Net learns to read it; Perfusion's covariance and i* assume exactly that. The toy's CLIP-
architecture encoder gets its own pretraining here: each object's noun, the last word of its
phrase ("on the left a red and green striped star"), must say through linear heads the object's
shape, colours, pattern and position, and the word `background` the background. So every object
is described in full at its noun before the U-Net ever reads the encoder, and the noun is the
token the localization loss, and Perfusion's key lock, tie to the object. The end and padding
tokens are pulled to one encoding (`tail_weight`): in a causal encoder they would otherwise repeat
the last noun, and Eq. 3 would read a concept named last at the end token as well.

    python main.py --base configs/toy/text_encoder.yaml -t   (stage 2 of `python -m ldm.toy.pretrain`)
    python -m ldm.toy.text_encoder --ckpt logs/toy-text-encoder.safetensors   # heads' accuracy, end token's sim
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.build import load_config
from ldm.checkpoint import load_into
from ldm.perfusion.covariance import estimate_covariance, first_eot, invert
from ldm.perfusion.edit import sim_probes
from ldm.perfusion.gate_settings import DEFAULT_BETA, DEFAULT_TAU
from ldm.toy.dataset import ToyCaptionDataset
from ldm.toy.world import BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, SHAPES, caption
from ldm.util import REPO_ROOT as ROOT
from ldm.util import instantiate_from_config

# attribute -> number of classes; the last class of colour, second colour, pattern and position
# is "not said" (the caption leaves it out, or a plain object has no second colour or pattern)
HEADS = {"shape": len(SHAPES), "colour": len(COLOURS) + 1, "second_colour": len(COLOURS) + 1,
         "pattern": len(PATTERNS) + 1, "position": len(POSITIONS) + 1}
NO_OBJECT = -100   # cross_entropy's ignore_index: the caption has no second object


def object_labels(obj) -> list[int]:
    """The HEADS classes of a requested object, in HEADS order."""
    colours, pattern = (obj.texture[1:], obj.texture[0]) if obj.texture else ((obj.colour, None), None)
    return [SHAPES.index(obj.shape),
            list(COLOURS).index(colours[0]) if colours[0] else len(COLOURS),
            list(COLOURS).index(colours[1]) if colours[1] else len(COLOURS),
            PATTERNS.index(pattern) if pattern else len(PATTERNS),
            list(POSITIONS).index(obj.position) if obj.position else len(POSITIONS)]


class ToyCaptionLabels(ToyCaptionDataset):
    """Items `{"caption": str, "labels": (2, 5) long, "background": long}` without rendering any
    image: the HEADS classes of each requested object in caption order (NO_OBJECT rows where the
    scene has one object) and the background's index (NO_OBJECT where the caption has none)."""

    def __getitem__(self, index: int) -> dict:
        _, request = self.scene(index)
        labels = torch.full((2, len(HEADS)), NO_OBJECT, dtype=torch.long)
        for k, obj in enumerate(request.objects):
            labels[k] = torch.tensor(object_labels(obj))
        background = BACKGROUNDS.index(request.background) if request.background else NO_OBJECT
        return {"caption": caption(request), "labels": labels, "background": torch.tensor(background)}


def tail_spread(hidden: torch.Tensor, tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Mean squared distance of the end and padding tokens' encodings from their batch mean: zero
    when the tail of a prompt says nothing about its caption, so Eq. 3 reads no concept there."""
    tail = torch.arange(tokens.shape[1], device=tokens.device) >= first_eot(tokens, eot_id)[:, None]
    h = hidden[tail]
    return (h - h.mean(0)).pow(2).mean()


@torch.no_grad()
def end_token_sim(encoder, captions, C_inv: torch.Tensor) -> torch.Tensor:
    """Per caption, Eq. 3's sim at the end token with i* = the encoding of the caption's last word,
    its noun: how much of a concept named last the end token repeats."""
    tokens = encoder.tokenize(captions)
    hidden = encoder.encode_embeddings(tokens, encoder.token_embedding(tokens))
    end, rows = first_eot(tokens, encoder.tokenizer.eot_token_id), torch.arange(len(tokens))
    probes = sim_probes(hidden[rows, end - 1], C_inv, hidden.device, torch.float64)   # one i* per caption
    return (probes * hidden[rows, end].double()).sum(-1)


class CaptionAttributes(pl.LightningModule):
    """The text encoder of `cond_stage_config`, trainable, with one linear head per attribute read
    at each object's noun (the k-th shape word is object k's) and a background head at `background`.
    The other LatentDiffusion params are accepted and ignored, so that the config is an overlay on
    the model's own (configs/toy/text_encoder.yaml): the encoder trained is the one the U-Net reads."""

    def __init__(self, cond_stage_config, learning_rate: float = 1e-3, tail_weight: float = 0.0,
                 **latent_diffusion_params):
        super().__init__()
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.cond_stage_model.requires_grad_(True)
        width = self.cond_stage_model.output_dim
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in HEADS.items()})
        self.background_head = nn.Linear(width, len(BACKGROUNDS))
        tokenizer = self.cond_stage_model.tokenizer
        self.register_buffer("noun_ids", torch.tensor([tokenizer.encode(s)[0] for s in SHAPES]), persistent=False)
        self.background_id = tokenizer.encode("background")[0]
        self.learning_rate, self.tail_weight = learning_rate, tail_weight

    def encode(self, captions) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.cond_stage_model
        tokens = encoder.tokenize(captions)
        return tokens, encoder.encode_embeddings(tokens, encoder.token_embedding(tokens))

    def losses(self, batch) -> dict[str, torch.Tensor]:
        tokens, hidden = self.encode(batch["caption"])
        out = {k: F.cross_entropy(logits, target)
               for k, (logits, target) in self.predictions(batch, tokens, hidden).items()}
        if self.tail_weight:
            out["tail"] = self.tail_weight * tail_spread(hidden, tokens, self.cond_stage_model.tokenizer.eot_token_id)
        return out

    def predictions(self, batch, tokens=None, hidden=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(logits, target classes) per head, one row per noun (or per `background` word)."""
        if tokens is None:
            tokens, hidden = self.encode(batch["caption"])
        is_noun = torch.isin(tokens, self.noun_ids)
        rows, positions = is_noun.nonzero(as_tuple=True)          # row-major: nouns in caption order
        objects = is_noun.long().cumsum(1)[rows, positions] - 1
        labels = batch["labels"][rows, objects]                   # (nouns, attributes)
        nouns = hidden[rows, positions]
        out = {name: (head(nouns), labels[:, k]) for k, (name, head) in enumerate(self.heads.items())}
        rows, positions = (tokens == self.background_id).nonzero(as_tuple=True)
        out["background"] = (self.background_head(hidden[rows, positions]), batch["background"][rows])
        return out

    def training_step(self, batch, batch_idx):
        losses = self.losses(batch)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(batch["caption"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.learning_rate, weight_decay=0.01)


@torch.no_grad()
def head_accuracy(model: CaptionAttributes, data: ToyCaptionLabels, batch_size: int = 256) -> dict[str, float]:
    """The fraction of nouns (and `background` words) whose attribute each head reads right."""
    right, total = {}, {}
    for start in range(0, len(data), batch_size):
        batch = torch.utils.data.default_collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        for name, (logits, target) in model.predictions(batch).items():
            right[name] = right.get(name, 0) + int((logits.argmax(-1) == target).sum())
            total[name] = total.get(name, 0) + len(target)
    return {k: right[k] / total[k] for k in right}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the text encoder stage's weights (with its heads)")
    p.add_argument("--n", type=int, default=2000, help="captions of each split")
    args = p.parse_args(argv)
    model = instantiate_from_config(load_config([ROOT / "configs/toy/text_encoder.yaml"]).model)
    load_into(model, args.ckpt)
    model.eval()
    for split in ("train", "heldout"):
        acc = head_accuracy(model, ToyCaptionLabels(args.n, seed=1000, split=split, p_textured=0.3))   # heldout: no textures
        print(f"{split} captions ({args.n}): " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()))
    encoder = model.cond_stage_model
    fresh = ToyCaptionDataset(args.n, seed=3)   # the covariance's captions, as pretraining draws them
    C_inv = invert(estimate_covariance(encoder, (fresh[i]["caption"] for i in range(args.n))))
    heldout = ToyCaptionLabels(args.n, seed=1000, split="heldout")
    sim = end_token_sim(encoder, [heldout[i]["caption"] for i in range(args.n)], C_inv)
    gate = torch.sigmoid((sim - DEFAULT_BETA[False]) / DEFAULT_TAU)
    print(f"end token's sim to the last noun (Eq. 3, C over {args.n} captions), held-out captions: median "
          f"{sim.median():.3f}, 90th percentile {sim.quantile(0.9):.3f}; its gate at beta {DEFAULT_BETA[False]}, "
          f"tau {DEFAULT_TAU}: median {gate.median():.3f}")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
