"""Placeholder tokens and the prompts that name concepts: `{}` (one concept) or `{1}`, `{2}`, ...
(in load order), each replaced by the rare token its concept was given at load time."""
from __future__ import annotations

import re
from typing import Sequence

from ldm.errors import UserError

# Rare single CLIP tokens (SD1 and SD2 share the BPE vocabulary); each one is checked at load time.
PLACEHOLDER_TOKENS = ("sks", "ohwx", "nlwx", "rctid", "httr", "shld", "wral", "pafc")
_SLOT = re.compile(r"\{(\d*)\}")


def placeholder_tokens(tokenizer, n: int) -> tuple[list[str], list[int]]:
    tokens = list(PLACEHOLDER_TOKENS[:n])
    ids = []
    for token in tokens:
        encoded = tokenizer.encode(token)
        if len(encoded) != 1:
            raise UserError(f"placeholder token {token!r} is not a single token of this tokenizer")
        ids.append(encoded[0])
    return tokens, ids


def word_pattern(word: str) -> re.Pattern:
    """`word` where CLIP's tokenizer can see it as a token: not inside a longer run of letters
    ("sks" in "a sks, on grass" but not in "asks"); case-insensitive, as the tokenizer lower-cases."""
    return re.compile(rf"(?<![^\W\d_]){re.escape(word)}(?![^\W\d_])", re.IGNORECASE)


def single_token_id(tokenizer, placeholder: str) -> int:
    ids = tokenizer.encode(placeholder)
    if len(ids) != 1:
        raise UserError(f"placeholder {placeholder!r} is {len(ids)} CLIP tokens; it must be exactly one "
                         "(for example '*' or 'sks')")
    return ids[0]


def superclass_token_ids(tokenizer, word: str) -> list[int]:
    """Token ids of the superclass; every token must be a whole word the vocabulary knows."""
    if "{" in word or "}" in word:   # templates put the word where their {} stands
        raise UserError(f"superclass {word!r} must be words, without {{ or }}")
    ids = tokenizer.encode(word)
    if not ids:
        raise UserError(f"superclass {word!r} is empty")
    pieces = [tokenizer.decode_token(i) for i in ids]
    if not all(p.endswith("</w>") for p in pieces):
        raise UserError(f"superclass {word!r} is not a known word: CLIP splits it into pieces "
                         f"{[p.replace('</w>', '') for p in pieces]}; use a common noun such as 'teddy' or 'cat'")
    return ids


def format_prompt(template: str, tokens: Sequence[str]) -> str:
    """Replace `{}` (one concept) or `{1}`, `{2}`, ... (1-based, load order) by the assigned tokens."""
    n = len(tokens)
    slots = _SLOT.findall(template)
    if "" in slots and len(slots) > slots.count(""):
        raise UserError(f"prompt {template!r} mixes '{{}}' with numbered placeholders; use {{1}}, {{2}}, ...")
    if "" in slots and n != 1:
        raise UserError(f"prompt {template!r} uses '{{}}' but {n} concepts are loaded; name them {{1}}..{{{n}}}")
    for slot in slots:
        if slot and not 1 <= int(slot) <= n:
            raise UserError(f"prompt {template!r} names {{{slot}}} but {n} concept{'s are' if n != 1 else ' is'} "
                             f"loaded ({{1}}..{{{n}}})")
    for token in tokens:
        if word_pattern(token).search(template):
            raise UserError(f"prompt {template!r} contains {token!r}, a word reserved for the concepts' placeholders")
    return _SLOT.sub(lambda m: tokens[int(m.group(1) or 1) - 1], template)


class PreparedPrompt(str):
    """A prompt made by `prepare_prompt` (a str), remembering the concepts it was made for."""
    loaded = None


def prepare_prompt(tokenizer, template: str, loaded) -> PreparedPrompt:
    """`format_prompt`, then check that each placeholder reaches the text encoder as a token of its own
    (and within the `tokenizer.max_length - 2` tokens it keeps between start and end)."""
    if not isinstance(template, str):
        raise UserError(f"prompt must be text with {{}} (or {{1}}, {{2}}, ...) for the concepts, got {template!r}")
    prompt = format_prompt(template, loaded.tokens)
    max_tokens = tokenizer.max_length - 2
    ids = tokenizer.encode(prompt)
    slots = [int(s or 1) for s in _SLOT.findall(template)]
    for n, (token, token_id) in enumerate(zip(loaded.tokens, loaded.token_ids), start=1):
        wanted = slots.count(n)
        if ids.count(token_id) != wanted or len(word_pattern(token).findall(prompt)) != wanted:
            raise UserError(f"in prompt {template!r} placeholder {{{n}}} merges with the characters next to it; "
                             "put spaces or punctuation around each placeholder")
        if ids[:max_tokens].count(token_id) != wanted:
            raise UserError(f"prompt {template!r} is {len(ids)} tokens; placeholder {{{n}}} falls beyond the text "
                             f"encoder's limit of {max_tokens}")
    prepared = PreparedPrompt(prompt)
    prepared.loaded = loaded
    return prepared


def check_prepared(prompts: Sequence[str], state) -> None:
    """Refuse a prompt that still has `{}` slots, or that was prepared for concepts other than those of
    `state` (the bank's ConceptState; the placeholder words are reused by every load)."""
    for prompt in prompts:
        if _SLOT.search(prompt):
            raise UserError(f"prompt {prompt!r} still names concepts with {{}}: pass it through "
                            "prepare_prompt(tokenizer, template, loaded) first")
        loaded = getattr(prompt, "loaded", None)
        if loaded is not None and loaded.state is not state:
            raise UserError(f"prompt {prompt!r} was prepared for concepts that are no longer loaded (replaced by "
                            "another load_concepts, or unloaded); prepare it again for the loaded ones")
