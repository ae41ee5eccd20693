"""The toy world's own column: whether the concept's look shows (ldm.toy.scorer), beside the random tiny
CLIP and DINO that only give the table its shape there. A toy prompt is read back into the Scene it asks
for (background, then objects 'on the left a green circle', the concept as '{}')."""
from __future__ import annotations

import re
from typing import Sequence

import torch

from ldm.errors import UserError

TOY_METRICS = ("shown", "asked")   # the concept's look is right; the prompt's other attributes are right


def toy_request(template: str, concept: str):
    """The Scene a toy template asks for, with the concept `concept` (a look of ldm.toy.world) at '{}'."""
    from ldm.toy.world import POSITION_PHRASES, Scene, SceneObject

    background, text = None, template
    match = re.fullmatch(r"on an? (\w+) background, (.*)", template)
    if match:
        background, text = match.groups()
    objects = []
    try:
        for part in text.split(" and "):
            position = next((p for p, phrase in POSITION_PHRASES.items() if part.startswith(phrase + " ")), None)
            article, noun = part[len(POSITION_PHRASES[position]) + 1 if position else 0:].split(" ", 1)
            if article not in ("a", "an"):
                raise ValueError(f"{article!r} where 'a' or 'an' was expected")
            if noun == "{}":
                objects.append(SceneObject.concept(concept, position))
            else:
                colour, shape = noun.split(" ")
                objects.append(SceneObject(shape, colour, position))
        return Scene(tuple(objects), background)
    except ValueError as err:
        raise UserError(f"toy prompt {template!r} is not in the toy grammar ('[on a gray background, ]on the left "
                        f"a {{}}[ and on the right a red circle]'): {err}") from None


class ToyJudge:
    """The toy scorer's verdict per image: shown (1 when the concept object has its look) and asked
    (the share of the prompt's other requested attributes that hold)."""

    def __init__(self, path):
        from ldm.toy.scorer import Scorer

        self.scorer = Scorer.load(path)

    def check(self, templates: Sequence[str], concept: str) -> None:
        for template in templates:
            toy_request(template, concept)

    def __call__(self, images: torch.Tensor, templates: Sequence[str], n_seeds: int, concept: str) -> dict:
        requests = [toy_request(t, concept) for t in templates for _ in range(n_seeds)]
        shown, asked = [], []
        for result, scene in zip(self.scorer.score(images, requests), requests):
            mine = [i for i, o in enumerate(scene.objects) if o.look != "plain"]
            shown.append(float(all(result["objects"][i]["look"] for i in mine)))
            others = [obj[a] for i, obj in enumerate(result["objects"])
                      for a in (("position",) if i in mine else ("shape", "colour", "position")) if obj[a] is not None]
            others += [result["background"]] if result["background"] is not None else []
            asked.append(sum(map(bool, others)) / len(others) if others else float("nan"))
        return {"shown": torch.tensor(shown), "asked": torch.tensor(asked)}
