"""The toy benchmark's experiment: what is trained (variants), what is drawn (held-out scenes and the
methods compared), and how an image is judged (ldm.toy.scorer's verdict per requested attribute)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ldm.perfusion.gate_settings import DEFAULT_BETA, DEFAULT_TAU
from ldm.toy import fewshot
from ldm.toy.world import Scene, SceneObject, caption, look_words
from ldm.util import REPO_ROOT as ROOT

CONFIG = ROOT / "configs/toy/perfusion.yaml"
CONCEPT_DIR = ROOT / "data/toy/concepts"

# Evaluation scenes: the concept (object 0 or 1) in positions, backgrounds and company never used
# in its training captions; the other objects are (colour, shape) pairs of pretraining.
SCENE_SPECS: tuple[tuple, ...] = (
    (("left",), (), None),
    (("top",), (), "gray"),
    (("centre",), (), "checkered"),
    (("bottom",), (), "brown"),
    (("right",), (("circle", "green", "left"),), None),
    (("top",), (("cross", "white", "bottom"),), "black"),
    (("right",), (("triangle", "red", "left"),), "black"),
    (("bottom",), (("square", "yellow", "top"),), None),
)
# past the concept token's sim (about 1) its gate shuts, so the sweep runs on to 1.2, as the showcase's does
BETAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
TAUS = (0.1, 0.15)
BETA, BETA_GLOBAL, TAU = DEFAULT_BETA[False], DEFAULT_BETA[True], DEFAULT_TAU   # the sampling defaults


GATE_PENALTY = 1.0   # the benchmark's gate-penalty variant (not in the paper: see model.params.gate_penalty)


@dataclass(frozen=True)
class Variant:
    """A trained concept variant: model.params.method, whether the loss is masked, where the gated
    edit applies in training (model.params.gate_at) and model.params.gate_penalty."""
    key: str
    method: str
    masks: bool
    gate_at: str = "all"
    gate_penalty: float = 0.0

    @property
    def overrides(self) -> tuple[str, ...]:
        return (f"model.params.method={self.method}", f"data.params.use_masks={self.masks}",
                f"model.params.gate_at={self.gate_at}", f"model.params.gate_penalty={self.gate_penalty}")


VARIANTS = (Variant("perfusion", "perfusion", True), Variant("trained_keys", "trained_keys", True),
            Variant("embedding", "embedding", True), Variant("perfusion_no_mask", "perfusion", False))
# The gate study (`--gate_study`): the same training with sim detached at other tokens, with the edit
# at the concept token only and with the leaked gates penalised.
GATE_STUDY = (Variant("perfusion_detached", "perfusion", True, "all_detached"),
              Variant("perfusion_gate_concept", "perfusion", True, "concept"),
              Variant("perfusion_gate_penalty", "perfusion", True, gate_penalty=GATE_PENALTY))
# Sim and gate at the other tokens at initialisation and after training with each rule.
GATE_ROWS = (("At initialisation (i* = i_super, superclass embedding)", "init"),
             ("Trained with Eq. 3 at every token", "perfusion"),
             ("Trained with sim detached at other tokens", "perfusion_detached"),
             ("Trained with the edit at the concept token only", "perfusion_gate_concept"),
             (f"Trained with the leaked gates penalised (gate_penalty {GATE_PENALTY:g})", "perfusion_gate_penalty"))
NARROW_GATE_ROWS = (("Trained, i* and i_super over the target templates (default)", "perfusion"),
                    ("Trained, i* and i_super over the images' captions", "targets_from_captions"))
SUPERCLASS = "Superclass word, no concept"
WORDS = "The look in words (a solid colour: its nearest colour word), no concept"
FULL_UNET = "Whole U-Net fine-tuned, superclass word (reference)"
# (row label, variant trained, global key-locking at sampling, gate_at at sampling); the last three
# rows load no concept and name the object by NO_CONCEPT[key] (the last one with a fine-tuned U-Net)
METHODS = (
    ("Perfusion, local key-locking", "perfusion", False, "all"),
    ("Perfusion, global key-locking", "perfusion", True, "all"),
    ("Perfusion, sampled with the edit at the concept token only", "perfusion", False, "concept"),
    ("Perfusion, trained with sim detached at other tokens", "perfusion_detached", False, "all"),
    ("Perfusion, edit at the concept token only (training and sampling)", "perfusion_gate_concept", False,
     "concept"),
    (f"Perfusion, trained with the leaked gates penalised (gate_penalty {GATE_PENALTY:g})", "perfusion_gate_penalty",
     False, "all"),
    ("Trained keys (ablation)", "trained_keys", False, "all"),
    ("Embedding only (textual inversion)", "embedding", False, "all"),
    ("Perfusion, no mask in training", "perfusion_no_mask", False, "all"),
    (WORDS, "words", False, "all"),
    (SUPERCLASS, "superclass", False, "all"),
    (FULL_UNET, "full_unet", False, "all"),
)
NO_CONCEPT = {"words": lambda o: look_words(o.look), "superclass": lambda o: o.shape,
              "full_unet": lambda o: o.shape}


def eval_scenes(concept: str, specs: Sequence[tuple] = SCENE_SPECS) -> list[Scene]:
    """One request Scene per spec: the concept at its position, plain objects beside it."""
    scenes = []
    for (position,), others, background in specs:
        objects = [SceneObject.concept(concept, position)] + [SceneObject(s, c, p) for s, c, p in others]
        if position in ("right", "bottom") and others:   # the concept second in the caption, too
            objects.reverse()
        scenes.append(Scene(tuple(objects), background))
    return scenes


def concept_index(scene: Scene) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if o.look != "plain"]


def templates(scenes: Sequence[Scene], nouns_for) -> list[str]:
    """Captions with the concept objects named by `nouns_for(object)` ('{}', '{1}', 'star', ...)."""
    return [caption(s, [nouns_for(o) if o.look != "plain" else None for o in s.objects]) for s in scenes]


def judge(results: Sequence[dict], scenes: Sequence[Scene]) -> dict[str, float]:
    """fidelity: concept objects whose look is right; alignment: all other requested attributes;
    both: images where every concept's look is right."""
    looks, others, both = [], [], []
    for result, scene in zip(results, scenes):
        concepts = concept_index(scene)
        image_looks = [bool(result["objects"][i]["look"]) for i in concepts]
        looks += image_looks
        both.append(all(image_looks))
        for i, obj in enumerate(result["objects"]):
            attrs = ("position",) if i in concepts else ("shape", "colour", "position")
            others += [bool(obj[a]) for a in attrs if obj[a] is not None]
        if result["background"] is not None:
            others.append(bool(result["background"]))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"fidelity": mean(looks), "alignment": mean(others), "both": mean(both), "images": len(results),
            "looks": len(looks), "attributes": len(others)}


def p_above(hits: int, n: int, floor_hits: int, floor_n: int) -> float:
    """One-sided Fisher exact test: the probability of `hits` or more of the pooled successes
    landing in the first group if both groups had the same rate (hypergeometric upper tail)."""
    total = hits + floor_hits
    tail = sum(math.comb(n, k) * math.comb(floor_n, total - k) for k in range(hits, min(n, total) + 1))
    return tail / math.comb(n + floor_n, total)



NARROW_METHODS = (   # (row label, fewshot curve, or a variant measured at the default gates)
    ("Perfusion (default settings)", fewshot.Curve()),
    ("Perfusion, global key-locking", fewshot.Curve(global_locking=True)),
    ("Perfusion, i* and i_super over the images' captions", fewshot.Curve("targets_from_captions")),
    ("Trained keys (ablation)", fewshot.Curve("trained_keys")),
    ("Perfusion, no mask in training", fewshot.Curve("no_mask")),
    ("Perfusion, 1 image", fewshot.Curve("one_image")),
    ("Embedding only (textual inversion)", "embedding"),
    (WORDS, "words"), (SUPERCLASS, "superclass"),
    ("Whole U-Net fine-tuned on the same images, superclass word (reference)", "full_unet"),
)



PAIR_EXAMPLE = caption(Scene((SceneObject("ring", position="left"), SceneObject("star", position="right"))),
                       nouns=["{1}", "{2}"])


def pair_scenes(a: str, b: str) -> list[Scene]:
    return [Scene((SceneObject.concept(x, p), SceneObject.concept(y, q)), None)
            for x, y in ((a, b), (b, a)) for p, q in (("left", "right"), ("top", "bottom"))]
