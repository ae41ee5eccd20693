"""Where the gate opens: the gate table (API, CLI, TensorBoard), the leak warning, and gate_at."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ldm.perfusion.edit import gated_rank1_edit
from ldm.perfusion.gates import format_gate_table, gate_summary, gate_tables, leak_warning, leaks
from ldm.perfusion.inference import load_concepts, unload_concepts
from ldm.perfusion.prompts import format_prompt
from ldm.sample import generate
from tests.concept_files import cat, cli_config, concept_file, dog, model  # noqa: F401 (fixtures)
from tests.conftest import ROOT, perfusion_batch, tiny_perfusion_model


@pytest.mark.parametrize("multi", ["named", "separate", "joint"])
def test_gate_table_is_eq3_at_every_token(model, cat, dog, multi):
    loaded = load_concepts(model, [cat, dog], [0.6, 0.7], [0.15, 0.2], multi=multi)
    prompt = format_prompt("a photo of a {1} and a {2}", loaded.tokens)
    table = gate_tables(model, [prompt])[0]
    assert len(table.tokens) == 77 and table.tokens[0] == "<start>" and table.tokens[-1] == "<pad>"
    assert table.tokens[1:4] == ["a", "photo", "of"] and "<end>" in table.tokens
    encoder = model.cond_stage_model
    tokens = encoder.tokenize([prompt])
    e = encoder.encode_embeddings(tokens, model.embed_tokens(tokens, model.placeholder_rows)).double()[0]
    C_inv = model.bank.C_inv.double()
    I = torch.stack([cat.i_star, dog.i_star]).double()
    coords = e @ C_inv @ I.T @ torch.linalg.inv(I @ C_inv @ I.T)   # the exact projection's coordinates
    for n, (concept, beta, tau) in enumerate(zip((cat, dog), (0.6, 0.7), (0.15, 0.2))):
        i = concept.i_star.double()
        sim = coords[:, n] if multi == "joint" else e @ C_inv @ i / (i @ C_inv @ i)
        gate = torch.sigmoid((sim - beta) / tau)
        other = tokens[0].tolist().index(loaded.token_ids[1 - n])
        if multi == "named":   # the other concept's placeholder is the other concept's alone
            sim[other] = gate[other] = 0
        assert torch.allclose(torch.tensor([row[n] for row in table.sim], dtype=torch.float64), sim, atol=1e-4)
        assert torch.allclose(torch.tensor([row[n] for row in table.gate], dtype=torch.float64), gate, atol=1e-4)
        own = [t for t in range(77) if table.own[t][n]]
        assert own == [tokens[0].tolist().index(loaded.token_ids[n])]
    text = format_gate_table(table)
    assert text.splitlines()[0] == prompt and "sim 2" in text.splitlines()[1] and "*" in text


def test_leaks_and_the_warning_name_the_tokens_and_the_closing_beta(model, cat):
    loaded = load_concepts(model, [cat], -5.0, 0.15)   # beta far below every sim: every gate opens
    table = gate_tables(model, [format_prompt("a photo of a {} on the beach", loaded.tokens)])[0]
    found = leaks(table)
    others = [t for t in range(77) if not table.own[t][0]]
    assert [f[0] for f in found] == [t for t in others if table.gate[t][0] > 0.5]
    assert found and all(not table.own[pos][0] for pos, *_ in found)
    line = leak_warning(table, loaded.betas)
    assert line.startswith("warning: in ") and "'photo'" in line and "\n" not in line
    assert f"beta above {max(f[3] for f in found):.2f}" in line
    loaded = load_concepts(model, [cat], 50.0, 0.15)   # beta far above: nothing opens
    table = gate_tables(model, [format_prompt("a photo of a {}", loaded.tokens)])[0]
    assert leaks(table) == [] and leak_warning(table, loaded.betas) is None


def test_gate_at_concept_edits_only_the_placeholder_token():
    torch.manual_seed(0)
    e, W = torch.randn(2, 9, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    I, O = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    A = torch.randn(6, 6, dtype=torch.float64)
    C_inv = A @ A.T + 6 * torch.eye(6, dtype=torch.float64)
    positions = torch.zeros(2, 9, 2, dtype=torch.bool)
    positions[0, 3, 0] = positions[1, 5, 1] = True
    for multi in ("separate", "approx"):
        full = gated_rank1_edit(e, W, I, O, C_inv, 0.3, 0.2, multi)
        only = gated_rank1_edit(e, W, I, O, C_inv, 0.3, 0.2, multi, positions, "concept")
        own = positions.any(-1)
        assert torch.equal(only[~own], (e @ W.T)[~own])      # every other token: the base projection
        single = [gated_rank1_edit(e[b:b + 1, t:t + 1], W, I[n:n + 1], O[n:n + 1], C_inv, 0.3, 0.2)
                  for b, t, n in positions.nonzero().tolist()]
        assert torch.allclose(only[own], torch.cat(single).reshape(-1, 5))   # its own concept alone
        assert not torch.allclose(full[~own], only[~own])
        detached = gated_rank1_edit(e, W, I, O, C_inv, 0.3, 0.2, multi, positions, "all_detached")
        assert torch.equal(detached, full)                  # same forward, other gradients
    with pytest.raises(ValueError, match="needs the placeholder positions"):
        gated_rank1_edit(e, W, I, O, C_inv, 0.3, 0.2, "separate", None, "concept")


def test_all_detached_stops_the_gradient_through_sim_at_other_tokens():
    torch.manual_seed(1)
    e = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    W, I, O = torch.randn(3, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    C_inv = torch.eye(4, dtype=torch.float64)
    positions = torch.zeros(1, 5, 1, dtype=torch.bool)
    positions[0, 2] = True
    grads = {}
    for rule in ("all", "all_detached"):
        e.grad = None
        gated_rank1_edit(e, W, I, O, C_inv, 0.1, 0.3, "named", positions, rule).sum().backward()
        grads[rule] = e.grad.clone()
    assert torch.allclose(grads["all"][0, 2], grads["all_detached"][0, 2])   # the placeholder: the same
    plain = torch.ones(1, 3, dtype=torch.float64) @ W                        # d(sum W e)/de at others
    assert torch.allclose(grads["all_detached"][0, [0, 1, 3, 4]], plain.expand(4, -1))
    assert not torch.allclose(grads["all"][0, [0, 1, 3, 4]], plain.expand(4, -1))


def test_gate_at_concept_sampling_differs_and_unload_restores(model, cat):
    prompt_t = "a photo of a {} on the beach"
    loaded = load_concepts(model, [cat], 0.0, 0.15)
    everywhere = generate(model, [format_prompt(prompt_t, loaded.tokens)], steps=2, scale=4.0, height=32, width=32)
    load_concepts(model, [cat], 0.0, 0.15, gate_at="concept")
    only = generate(model, [format_prompt(prompt_t, loaded.tokens)], steps=2, scale=4.0, height=32, width=32)
    assert not torch.equal(everywhere, only)
    load_concepts(model, [cat], 0.0, 0.15, global_locking=True, gate_at="concept")   # both layouts at once
    assert torch.isfinite(generate(model, [format_prompt(prompt_t, loaded.tokens)], steps=2, scale=4.0,
                                   height=32, width=32)).all()
    unload_concepts(model)
    assert model.bank.gate_at == "all" and not model.bank.global_locking
    with pytest.raises(ValueError, match="gate_at must be"):
        load_concepts(model, [cat], 0.5, 0.15, gate_at="everywhere")


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["all", "all_detached", "concept"])
def test_training_rules_train_and_log_gates_to_tensorboard(rule, tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    m = tiny_perfusion_model(f"model.params.gate_at={rule}", "model.params.log_gates_every_n_steps=1")
    batches = [perfusion_batch(m, seed=i) for i in range(3)]
    loader = DataLoader(batches, batch_size=None)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    trainer = pl.Trainer(max_steps=3, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    start = m.embedding.detach().clone() if bool(m.initialized) else None
    trainer.fit(m, loader)
    assert start is None or not torch.equal(start, m.embedding)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"gates/concept_sim", "gates/concept_gate", "gates/max_other_gate", "gates/others_open"} <= tags
    summary = gate_summary(gate_tables(m, m.validation_prompts))
    assert 0.0 <= summary["max_other_gate"] <= 1.0 and summary["others_open"] >= 0


def test_gate_summary_counts():
    from ldm.perfusion.gates import GateTable

    table = GateTable("p", ["<start>", "a", "*", "<end>"], [[False], [False], [True], [False]],
                      [[0.1], [0.9], [1.0], [0.2]], [[0.01], [0.8], [0.95], [0.6]])
    s = gate_summary([table])
    assert s == {"concept_sim": 1.0, "concept_gate": 0.95, "max_other_gate": 0.8, "others_open": 2}


def test_cli_show_gates_prints_the_table_and_samples_nothing(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("perfusion_txt2img", ROOT / "scripts/perfusion_txt2img.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--config", str(cli_config()), "--personalized_ckpt", str(concept_file("cat", 0)),
            "--prompt", "a photo of a {} on the beach", "--show_gates", "--outdir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        script.run_cli(lambda: script.main(argv))
    out = capsys.readouterr().out
    assert info.value.code == 0 and not (tmp_path / "out").exists()
    assert "sim 1" in out and "gate 1" in out and " photo " in out and out.count("<pad>") > 10
    argv = [a for a in argv if a != "--show_gates"] + ["--beta", "-5", "--steps", "1", "--n_samples", "1",
                                                       "--H", "32", "--W", "32"]
    with pytest.raises(SystemExit) as info:
        script.run_cli(lambda: script.main(argv))
    err = capsys.readouterr().err
    assert info.value.code == 0
    assert sum(line.startswith("warning: in ") for line in err.splitlines()) == 1 and "would close them" in err


def test_cli_multi_concept_flags_choose_the_gates(capsys, tmp_path):
    """--separate_gates prints Eq. 3's own sim per concept, --exact_multi (joint) the exact projection's
    coordinates, the default (named) Eq. 3's sim with the other concept's gate shut at each placeholder."""
    spec = importlib.util.spec_from_file_location("perfusion_txt2img", ROOT / "scripts/perfusion_txt2img.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--config", str(cli_config()), "--personalized_ckpt", f"{concept_file('cat', 0)},{concept_file('dog', 1)}",
            "--prompt", "a {1} and a {2}", "--show_gates", "--outdir", str(tmp_path / "out")]
    tables = {}
    for flag in ("--exact_multi", "--separate_gates", "--approx_multi", "--multi=named"):
        with pytest.raises(SystemExit) as info:
            script.run_cli(lambda: script.main(argv + [flag]))
        assert info.value.code == 0
        tables[flag] = capsys.readouterr().out
    assert tables["--separate_gates"] == tables["--approx_multi"]   # both gate by Eq. 3's sim_n
    assert tables["--exact_multi"] != tables["--separate_gates"]
    named = tables["--multi=named"].splitlines()
    assert named != tables["--separate_gates"].splitlines()
    # the rows that differ are the two placeholders', where the other concept's sim and gate read 0
    changed = [a for a, b in zip(named, tables["--separate_gates"].splitlines()) if a != b]
    assert len(changed) == 2 and all(line.count("0.000") == 2 and "*" in line for line in changed)


def test_gate_penalty_adds_the_mean_leaked_gate_and_closes_the_leaks():
    base, penalised = tiny_perfusion_model(), tiny_perfusion_model("model.params.gate_penalty=10")
    batch = perfusion_batch(base, seed=1)
    losses = {}
    for name, m in (("base", base), ("penalised", penalised)):
        m.train()
        torch.manual_seed(3)
        losses[name] = m.shared_step(batch)
    # the leaked gate, from Eq. 3 written out, over every token but the placeholder's
    encoder = penalised.cond_stage_model
    tokens = encoder.tokenize(batch["caption"])
    e = encoder.encode_embeddings(tokens, penalised.embed_tokens(tokens, penalised.placeholder_rows)).double()
    i, C_inv = penalised.i_star.double(), penalised.bank.C_inv.double()
    gate = torch.sigmoid((e @ C_inv @ i / (i @ C_inv @ i) - penalised.beta) / penalised.tau)
    leak = gate[tokens != penalised.placeholder_id].mean()
    assert torch.allclose(losses["penalised"].double() - losses["base"].double(), 10 * leak, atol=1e-5)
    assert leak > 1e-3   # so the equality above is not 0 == 0

    def leak_after(m, steps=15):
        opt = m.configure_optimizers()
        for step in range(steps):
            torch.manual_seed(step)
            loss = m.shared_step(perfusion_batch(m, seed=step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return gate_summary(gate_tables(m, m.validation_prompts))["max_other_gate"]

    assert leak_after(penalised) < leak_after(base) - 0.05
    with pytest.raises(ValueError, match="gate_penalty must be >= 0"):
        tiny_perfusion_model("model.params.gate_penalty=-1")
