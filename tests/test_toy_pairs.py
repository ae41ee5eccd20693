"""Two concepts in one model on the toy world (ldm.toy.pairs): the probe that sees an unnamed concept,
and the study end to end (reduced: --quick) on the shipped concepts."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from ldm.errors import PerfusionWarning
from ldm.toy.pairs import main as pairs
from ldm.toy.pairs import one_named_scenes, seen
from ldm.toy.runner import Bench
from ldm.toy.train_scorer import render_set
from ldm.toy.world import CONCEPTS


@pytest.fixture(scope="module")
def bench():
    return Bench(seeds=1, steps=2)


def test_the_probe_sees_the_unnamed_concept_only_where_it_is_drawn(bench):
    """The scorer reads the second object of the probe scenes as the unnamed concept: drawn as that
    concept it is seen, drawn as the plain white object the prompt asks for it is not."""
    requests, probes = one_named_scenes("magenta_square", "polka_dot_square")
    assert [o.colour for s in requests for o in s.objects[1:]] == ["white"] * 4
    assert all(s.objects[1].shape == CONCEPTS["polka_dot_square"].shape for s in requests)
    drawn = lambda scenes: render_set([replace(s, background="black") for s in scenes]).float() / 255  # noqa: E731
    assert seen(bench, drawn(probes), probes, 1, 1) == 1.0
    assert seen(bench, drawn(requests), probes, 1, 1) == 0.0
    assert seen(bench, drawn(requests), requests, 1, 0) == 1.0   # the named one, drawn


@pytest.mark.slow
def test_pair_study_quick(tmp_path, capsys):
    out = tmp_path / "pairs"
    with pytest.warns(PerfusionWarning, match="magenta_square.safetensors and .*polka_dot_square.safetensors: their i"):
        assert pairs(["--out", str(out), "--quick", "--concepts", "magenta_square,polka_dot_square,teal_ring"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["pairs"]) == ["magenta_square + polka_dot_square", "magenta_square + teal_ring",
                                      "polka_dot_square + teal_ring"]
    assert [p["same_superclass"] for p in results["pairs"].values()] == [True, False, False]
    # the shipped concepts of one superclass are the ill-conditioned case the joint rule warns of
    conds = [p["cond_G"] for p in results["pairs"].values()]
    assert conds[0] > 10 > max(conds[1:])
    for pair in results["pairs"].values():
        assert set(pair["rules"]) == {"named", "separate", "joint", "approx"}
        for rule, figures in pair["rules"].items():
            assert figures["both"]["images"] == 4 * 2   # 4 prompts x twice the seeds
            named = [k for k in figures if k not in ("both", "gates")]
            assert len(named) == 2 and all(0 <= figures[k]["unnamed_seen"] <= 1 for k in named)
            assert all(figures[k]["images"] == 4 for k in named)
            if rule == "named":   # a placeholder is its own concept's alone
                assert figures["gates"]["cross_gate"] == 0.0
        assert pair["rules"]["separate"]["gates"]["cross_gate"] > 0
    report = (out / "report.md").read_text()
    assert "## Checks (default rule: named)" in report and "same superclass: both present" in report
    printed = capsys.readouterr().out
    assert "report: " in printed and printed.count("same superclass") == 3
