"""Where Eq. 3's gate opens: sim and gate of every token of a prompt, for each active concept.

    from ldm.perfusion.gates import gate_tables, format_gate_table, leaks
    loaded = load_concepts(model, ["teddy.safetensors"], 0.7, 0.15)
    table = gate_tables(model, [prepare_prompt(tokenizer, "a {} on the beach", loaded)])[0]
    print(format_gate_table(table))

The gate sigmoid((sim - beta) / tau) is evaluated at every token (start, words, end, padding),
and a token other than the concept's own whose gate opens receives o*_V and loses its own
content along i*. `leaks` lists those tokens; the beta that closes them (gate 0.5) is their sim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ldm.errors import UserError
from ldm.perfusion.edit import rule_gates
from ldm.perfusion.prompts import check_prepared


@dataclass
class GateTable:
    """One prompt: per token (position order) its label, and per concept its sim and gate; `own[t][n]`
    is True where token t is concept n's placeholder."""
    prompt: str
    tokens: list[str]
    own: list[list[bool]]
    sim: list[list[float]]
    gate: list[list[float]]

    def owned(self, n: int = 0) -> list[int]:
        """Positions of concept n's own placeholder."""
        return [t for t, own in enumerate(self.own) if own[n]]

    def others(self, n: int = 0) -> list[int]:
        """Every other position (start, words, end, padding, other concepts' tokens)."""
        return [t for t, own in enumerate(self.own) if not own[n]]


def _labels(tokenizer, ids: list[int]) -> list[str]:
    labels, ended = [], False
    for i in ids:
        if ended:
            labels.append("<pad>")
            continue
        if i == tokenizer.sot_token_id:
            labels.append("<start>")
        elif i == tokenizer.eot_token_id:
            labels.append("<end>")
            ended = True
        else:
            labels.append(tokenizer.decode_token(i).replace("</w>", ""))
    return labels


@torch.no_grad()
def gate_tables(model, prompts: Sequence[str]) -> list[GateTable]:
    """sim and gate at every token of each (formatted) prompt, as the value pathway sees it, for the
    concepts active in `model.bank` (loaded by `load_concepts`, or the concept being trained)."""
    bank = model.bank
    if not bank.active:
        raise UserError("no Perfusion concept is active (textual-inversion concepts have no gate)")
    model.ensure_covariance()
    if model.placeholder_rows:   # concepts loaded for sampling (not the one being trained)
        check_prepared(prompts, bank.state)
    encoder = model.cond_stage_model
    rows = model.concept_rows()
    tokens = encoder.tokenize(list(prompts)).to(model.device)
    e = encoder.encode_embeddings(tokens, model.embed_tokens(tokens, rows))
    own = tokens[..., None] == torch.tensor(list(rows), device=tokens.device)
    sim, gate = rule_gates(e, bank.i_star, bank.C_inv, bank.gates.beta, bank.gates.tau, bank.multi, own, bank.gate_at)
    return [GateTable(p, _labels(encoder.tokenizer, t.tolist()), o.tolist(), s.tolist(), g.tolist())
            for p, t, o, s, g in zip(prompts, tokens, own, sim.float().cpu(), gate.float().cpu())]


def leaks(table: GateTable, threshold: float = 0.5) -> list[tuple[int, str, int, float, float]]:
    """(position, token, concept index, sim, gate) of every token whose gate for a concept that is
    not its own exceeds `threshold`."""
    return [(t, label, n, table.sim[t][n], table.gate[t][n])
            for t, label in enumerate(table.tokens) for n in range(len(table.gate[t]))
            if not table.own[t][n] and table.gate[t][n] > threshold]


def leak_warning(table: GateTable, betas: Sequence[float], threshold: float = 0.5) -> str | None:
    """One line naming the leaking tokens and the beta that would close them, or None."""
    found = leaks(table, threshold)
    if not found:
        return None
    parts = []
    for n in sorted({f[2] for f in found}):
        mine = [f for f in found if f[2] == n]
        close = max(f[3] for f in mine)
        own = [table.sim[t][n] for t in table.owned(n)]
        words = ", ".join(f"{label!r}" for _, label, *_ in mine[:6]) + (f" and {len(mine) - 6} more" if len(mine) > 6 else "")
        note = f"; its own token's sim is {min(own):.2f}, so that beta closes it too" if own and min(own) <= close else ""
        parts.append(f"concept {n + 1} (beta {betas[n]:g}): gate above {threshold} at {words}; "
                     f"beta above {close:.2f} would close them{note}")
    return f"warning: in {table.prompt!r}, " + "; ".join(parts)


def format_gate_table(table: GateTable) -> str:
    """The table as text: position, token, then sim and gate per concept (own tokens marked *)."""
    n = len(table.sim[0]) if table.sim else 0
    head = f"{'pos':>3}  {'token':<14}" + "".join(f"  {'sim ' + str(k + 1):>7} {'gate ' + str(k + 1):>7}" for k in range(n))
    lines = [table.prompt, head]
    for t, label in enumerate(table.tokens):
        cells = "".join(f"  {table.sim[t][k]:7.3f} {table.gate[t][k]:7.3f}{'*' if table.own[t][k] else ' '}"
                        for k in range(n))
        lines.append(f"{t:>3}  {label[:14]:<14}{cells}")
    return "\n".join(lines)


def gate_summary(tables: Sequence[GateTable], threshold: float = 0.5) -> dict[str, float]:
    """Means over prompts (concept 1): sim and gate at its own token, the largest gate at any other
    token, and how many other tokens are above `threshold` (what training logs to TensorBoard)."""
    own_sim, own_gate, other_max, other_open = [], [], [], []
    for table in tables:
        others = [table.gate[t][0] for t in table.others()]
        own_sim += [table.sim[t][0] for t in table.owned()]
        own_gate += [table.gate[t][0] for t in table.owned()]
        other_max.append(max(others, default=0.0))
        other_open.append(sum(g > threshold for g in others))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"concept_sim": mean(own_sim), "concept_gate": mean(own_gate),
            "max_other_gate": mean(other_max), "others_open": mean(other_open)}
