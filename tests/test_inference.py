"""Sampling with loaded Perfusion concepts: Appendix B, base identity, caching, global locking, bad input."""
from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import pytest
import torch

import ldm.perfusion.edit as perfusion_edit
from ldm.errors import PerfusionWarning
from ldm.modules.tokenizer import CLIPTokenizer
from ldm.perfusion.concepts import ConceptError, load_concept, save_concept
from ldm.perfusion.inference import JOINT_COND_LIMIT, i_star_correlations, load_concepts, set_gates, unload_concepts
from ldm.perfusion.prompts import PLACEHOLDER_TOKENS, format_prompt, prepare_prompt
from ldm.sample import generate
from tests.concept_files import cat, concept_file, dog, model  # noqa: F401 (fixtures)

PROMPT2 = "a photo of a {1} and a {2}"
SAMPLE = dict(steps=3, scale=4.0, height=32, width=32, seed=5)


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def _appendix_b(context, W, I, O, C_inv, betas, taus, multi):
    """Several concepts computed directly in float64 (Appendix B): oblique projection
    P = I^T (I C^-1 I^T)^-1 I C^-1 removed from e, plus the sum of the gated targets, gated by each
    concept's own sim ("separate"), by the projection's coordinates ("joint"), or with e - sim_n i*_n
    and concept n's gate alone at its placeholder ("named": the context's extra channels mark them)."""
    context, W, I, O, C_inv = (t.double() for t in (context, W, I, O, C_inv))
    e, positions = context[..., :W.shape[1]], context[..., W.shape[1]:] > 0.5
    betas, taus = torch.tensor(betas, dtype=torch.float64), torch.tensor(taus, dtype=torch.float64)
    sims = (e @ C_inv @ I.T) / torch.einsum("nd,de,ne->n", I, C_inv, I)
    G_inv = torch.linalg.inv(I @ C_inv @ I.T)
    base = (e - e @ (I.T @ G_inv @ I @ C_inv).T) @ W.T
    if multi == "joint":
        sims = e @ C_inv @ I.T @ G_inv
    if multi == "approx":
        base = e @ W.T - sims @ (I @ W.T)
    gates = _sigmoid((sims - betas) / taus)
    if multi == "named":
        own = positions.any(-1, keepdim=True)
        alone = e @ W.T - (sims * positions) @ (I @ W.T)
        base, gates = torch.where(own, alone, base), torch.where(own, gates * positions, gates)
    return base + gates @ O


def test_placeholder_tokens_are_single_tokens_for_sd1_and_sd2():
    for tokenizer in (CLIPTokenizer(pad_with_eot=True), CLIPTokenizer(pad_with_eot=False)):
        ids = [tokenizer.encode(t) for t in PLACEHOLDER_TOKENS]
        assert all(len(i) == 1 for i in ids)
        assert len({i[0] for i in ids}) == len(PLACEHOLDER_TOKENS)


def test_format_prompt():
    assert format_prompt("a photo of a {}", ["sks"]) == "a photo of a sks"
    assert format_prompt("a {1} and a {2}, {1} again", ["sks", "ohwx"]) == "a sks and a ohwx, sks again"
    assert format_prompt("a {1} that asks for food", ["sks"]) == "a sks that asks for food"
    assert format_prompt("no concept here", ["sks", "ohwx"]) == "no concept here"
    with pytest.raises(ValueError, match=r"names \{3\} but 2 concepts are loaded"):
        format_prompt("a {1} and a {3}", ["sks", "ohwx"])
    with pytest.raises(ValueError, match=r"uses '\{\}' but 2 concepts are loaded"):
        format_prompt("a photo of a {}", ["sks", "ohwx"])
    with pytest.raises(ValueError, match="mixes"):
        format_prompt("a {} and a {1}", ["sks"])
    with pytest.raises(ValueError, match="reserved"):
        format_prompt("a Sks photo of a {}", ["sks"])


def test_prepare_prompt(model, cat):
    loaded = load_concepts(model, [cat], 0.7, 0.15)
    tokenizer = model.cond_stage_model.tokenizer
    assert prepare_prompt(tokenizer, "a {}, on grass", loaded) == "a sks, on grass"
    assert prepare_prompt(tokenizer, "a {}2 on grass", loaded) == "a sks2 on grass"
    with pytest.raises(ValueError, match=r"placeholder \{1\} merges with the characters next to it"):
        prepare_prompt(tokenizer, "a {}s on grass", loaded)
    with pytest.raises(ValueError, match="falls beyond the text encoder's limit of 75"):
        prepare_prompt(tokenizer, "a cat " * 40 + "and a {}", loaded)


@pytest.mark.parametrize("multi", ["named", "separate", "joint", "approx"])
def test_multi_concept_output_equals_appendix_b(model, cat, dog, multi):
    betas, taus = [0.55, 0.7], [0.1, 0.2]
    loaded = load_concepts(model, [cat, dog], betas, taus, multi=multi)
    I = torch.stack([cat.i_star, dog.i_star])
    I_super = torch.stack([cat.i_super, dog.i_super])
    C_inv = model.bank.C_inv

    def direct(layer, x):
        W = layer.weight
        O = I_super.double() @ W.T.double() if layer.role == "key" else \
            torch.stack([cat.o_star_v[layer.index], dog.o_star_v[layer.index]])
        return _appendix_b(x, W, I, O, C_inv, betas, taus, multi)

    # The whole U-Net in float64 (a copy): the patched projections against the formula put in their place.
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        e = m64.get_learned_conditioning([format_prompt(PROMPT2, loaded.tokens), "a dog"])
        for layer in (m64.bank.values[3], m64.bank.keys[0]):
            assert torch.allclose(layer(e), direct(layer, e), atol=1e-6)   # float64; o*_K was made in float32
        x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).double(), torch.tensor([50, 700])
        out = m64.apply_model(x, t, e)
        layers = m64.bank.keys + m64.bank.values
        for layer in layers:
            layer.forward = (lambda lay: lambda x: direct(lay, x))(layer)
        reference = m64.apply_model(x, t, e)
        for layer in layers:
            del layer.forward
        m64.bank.clear()
        plain = e[..., :layers[0].in_features]   # without the placeholder channels the named rule adds
        assert (out - m64.apply_model(x, t, plain)).abs().max() > 1e-3    # the edit did something
        # float32 (the model as it samples): same up to float32 rounding (C^-1 is ill-conditioned here)
        layer = model.bank.values[3]
        assert torch.allclose(layer(e.float()).double(), direct(layer, e), atol=2e-2)
    assert torch.allclose(out, reference, atol=1e-5), (out - reference).abs().max()


def test_no_concept_is_bit_identical_to_base(model, tiny_v1, cat, dog):
    prompts = ["a photo of a cat", "a dog on the beach"]
    base = generate(tiny_v1, prompts, **SAMPLE)
    assert torch.equal(generate(model, prompts, **SAMPLE), base)
    load_concepts(model, [cat, dog], 0.6, 0.15, global_locking=True)
    assert not torch.equal(generate(model, prompts, **SAMPLE), base)
    unload_concepts(model)
    assert model.placeholder_rows == {} and not model.bank.active and not model.bank.global_locking
    assert torch.equal(generate(model, prompts, **SAMPLE), base)


@pytest.mark.parametrize("sampler,global_locking", [("ddim", False), ("euler", True)])
def test_cached_equals_uncached(model, cat, dog, monkeypatch, sampler, global_locking):
    loaded = load_concepts(model, [cat, dog], [0.6, 0.7], 0.15, global_locking=global_locking)
    prompts = [format_prompt(PROMPT2, loaded.tokens)] * 2
    calls = []
    edit = perfusion_edit.gated_rank1_edit
    monkeypatch.setattr(perfusion_edit, "gated_rank1_edit", lambda *a, **k: calls.append(1) or edit(*a, **k))
    steps = 4
    edited = 7 if global_locking else 2 * 7   # global locking: keys are the plain W_K e_sup
    cached = generate(model, prompts, sampler=sampler, **dict(SAMPLE, steps=steps))
    assert len(calls) == edited           # keys and values of 7 layers, once for the whole sampling
    calls.clear()
    model.bank.cache = False
    try:
        uncached = generate(model, prompts, sampler=sampler, **dict(SAMPLE, steps=steps))
    finally:
        model.bank.cache = True
    assert len(calls) == edited * steps    # ... and once per step without the cache
    assert torch.equal(cached, uncached)
    calls.clear()
    with torch.inference_mode():           # tensors without a version counter: cached by identity
        assert torch.equal(generate(model, prompts, sampler=sampler, **dict(SAMPLE, steps=steps)), cached)
    assert len(calls) == edited


def test_new_gates_or_prompt_do_not_reuse_stale_cache(model, cat):
    loaded = load_concepts(model, [cat], 0.5, 0.15)
    prompt = [format_prompt("a photo of a {}", loaded.tokens)]
    low = generate(model, prompt, **SAMPLE)
    set_gates(model, loaded, 0.9, 0.15)
    high = generate(model, prompt, **SAMPLE)
    model.bank.cache = False
    try:
        assert torch.equal(high, generate(model, prompt, **SAMPLE))
        set_gates(model, loaded, 0.5, 0.15)
        assert torch.equal(low, generate(model, prompt, **SAMPLE))
    finally:
        model.bank.cache = True
    assert not torch.equal(low, high)


def test_two_concepts_with_the_same_placeholder_both_act(model, cat, dog):
    assert cat.placeholder == dog.placeholder == "*"
    loaded = load_concepts(model, [cat, dog], 0.6, 0.15)
    prompt = format_prompt(PROMPT2, loaded.tokens)
    tokens = model.cond_stage_model.tokenize([prompt])[0]
    a, b = loaded.token_ids
    assert a != b and (tokens == a).sum() == 1 and (tokens == b).sum() == 1
    embeds = model.embed_tokens(tokens[None], model.placeholder_rows)[0]
    assert torch.equal(embeds[tokens == a][0], cat.embedding) and torch.equal(embeds[tokens == b][0], dog.embedding)
    both = generate(model, [prompt], **SAMPLE)
    # Only the cat loaded, the dog concept replaced by its superclass word; and the other way round.
    only_cat = load_concepts(model, [cat], 0.6, 0.15)
    cat_alone = generate(model, [format_prompt("a photo of a {} and a dog", only_cat.tokens)], **SAMPLE)
    only_dog = load_concepts(model, [dog], 0.6, 0.15)
    dog_alone = generate(model, [format_prompt("a photo of a cat and a {}", only_dog.tokens)], **SAMPLE)
    unload_concepts(model)
    neither = generate(model, ["a photo of a cat and a dog"], **SAMPLE)
    for other in (cat_alone, dog_alone, neither):
        assert (both - other).abs().max() > 1e-4
    assert (cat_alone - dog_alone).abs().max() > 1e-4


def _layer_outputs(model, context):
    """What every edited key/value layer returns for `context`, keyed by (role, index)."""
    seen = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out: seen.setdefault((mod.role, mod.index), out))
             for layer in model.bank.keys + model.bank.values]
    try:
        latent = torch.randn(1, 4, 16, 16, dtype=context.dtype)
        model.apply_model(latent, torch.tensor([300]), context)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_global_locking_keys_are_the_superclass_prompts_keys(model, cat, dog):
    """Global key-locking (Sec. 4): K = W_K e_sup bit for bit; values keep the gated edit."""
    betas, taus = [0.5, 0.6], [0.15, 0.2]
    loaded = load_concepts(model, [cat, dog], betas, taus, global_locking=True)
    prompt = format_prompt(PROMPT2, loaded.tokens)
    encoder = model.cond_stage_model
    with torch.no_grad():
        context = model.get_learned_conditioning([prompt])
        tokens = encoder.tokenize([prompt])
        concept_enc = encoder.encode_embeddings(tokens, model.embed_tokens(tokens, model.placeholder_rows))
        super_enc = encoder.encode(["a photo of a cat and a dog"])
        assert context.shape == (1, 2 * 77, 64 + 2)   # + where each placeholder sits (the named rule)
        assert torch.equal(context[:, :77, :64], concept_enc) and torch.equal(context[:, 77:, :64], super_enc)
        flags = context[0, :77, 64:]
        assert flags.sum(0).tolist() == [1, 1] and torch.equal(context[0, 77:, 64:], flags)
        assert model.get_learned_conditioning([""]).shape == (1, 2 * 77, 64 + 2)   # the unconditional half too
        seen = _layer_outputs(model, context)
    I = torch.stack([cat.i_star, dog.i_star])
    for index in range(7):
        W_k, W_v = model.bank.keys[index].weight, model.bank.values[index].weight
        assert torch.equal(seen[("key", index)], torch.nn.functional.linear(super_enc, W_k))
        o_value = torch.stack([cat.o_star_v[index], dog.o_star_v[index]])
        expected_v = _appendix_b(context[:, :77], W_v, I, o_value, model.bank.C_inv, betas, taus, "named")
        assert torch.allclose(seen[("value", index)].double(), expected_v, atol=1e-5)
    images = generate(model, [prompt], negative_prompt="blurry", **SAMPLE)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


@pytest.mark.parametrize("filler", [0, 66])   # a short prompt, and one the 77-token limit cuts
def test_global_locking_aligns_multi_token_superclasses(model, cat, dog, filler):
    """From each concept on, the key pathway's input is the superclass prompt's encoding of the same
    word: the superclass's last sub-token at the concept's slot, later words one to one."""
    teddy, dog3 = replace(cat, superclass="teddy bear"), replace(dog, superclass="small brown dog")
    loaded = load_concepts(model, [teddy, dog3], 0.6, 0.15, global_locking=True)
    words = " ".join(["red"] * filler)
    template = f"a {{1}} sits by a {{2}} on the beach {words}".strip()
    prompt = format_prompt(template, loaded.tokens)
    superclass_prompt = template.replace("{1}", "teddy bear").replace("{2}", "small brown dog")
    encoder, tokenizer = model.cond_stage_model, model.cond_stage_model.tokenizer
    tokens, super_tokens = tokenizer([prompt])[0], tokenizer([superclass_prompt])[0]
    with torch.no_grad():
        context = model.get_learned_conditioning([prompt])
        super_enc = encoder.encode([superclass_prompt])[0]
        seen = _layer_outputs(model, context)
    key_input = context[0, 77:, :super_enc.shape[-1]]   # less the placeholder channels (the named rule)
    bear, dog_id = tokenizer.encode("bear")[0], tokenizer.encode("dog")[0]
    first = tokens.tolist().index(loaded.token_ids[0])
    end = tokens.tolist().index(tokenizer.eot_token_id)
    lost = 0
    for j in range(first, 77):
        match = [k for k in range(77) if torch.equal(super_enc[k], key_input[j])]
        assert len(match) == 1
        k = match[0]
        if j <= end and tokens[j] == loaded.token_ids[0]:
            assert super_tokens[k] == bear
        elif j <= end and tokens[j] == loaded.token_ids[1]:
            assert super_tokens[k] == dog_id
        elif j < end and k < 76:
            assert super_tokens[k] == tokens[j]        # every later word faces its own key
        else:
            lost += k == 76                            # end, padding, or words cut by the 77-token limit
    assert torch.equal(key_input[:first], super_enc[:first])
    assert lost >= 3   # the superclass prompt is 3 tokens longer: its last positions pad the end
    for index in range(7):
        assert torch.equal(seen[("key", index)], torch.nn.functional.linear(key_input[None], model.bank.keys[index].weight))


@pytest.mark.parametrize("part", ["unet", "text_encoder", "covariance"])
def test_concept_from_another_model_is_refused(model, cat, tmp_path, part):
    path = tmp_path / f"other-{part}.safetensors"
    save_concept(path, replace(cat, fingerprints={**cat.fingerprints, part: "0123456789abcdef"}))
    mine = model.fingerprints()[part]
    with pytest.raises(ConceptError, match=f"other-{part}.safetensors: trained with {part} fingerprint "
                                           f"0123456789abcdef, but this model's is {mine}"):
        load_concepts(model, [concept_file("cat", 0), path])
    assert not model.bank.active   # nothing half-loaded


def test_bad_gates_and_duplicates(model, cat, dog):
    with pytest.raises(ValueError, match="beta has 3 values for 2 concepts"):
        load_concepts(model, [cat, dog], [0.5, 0.6, 0.7], 0.15)
    with pytest.raises(ValueError, match="tau has 2 values for 1 concepts"):
        load_concepts(model, [cat], 0.5, [0.1, 0.2])
    for tau in (0.0, -0.1):
        with pytest.raises(ValueError, match="tau must be > 0"):
            load_concepts(model, [cat, dog], 0.5, [0.1, tau])
    for multi in ("named", "approx"):   # the approximation would subtract the same projection twice
        with pytest.raises(ConceptError, match="a.safetensors and b.safetensors have the same target input i"):
            load_concepts(model, [cat, cat], 0.5, 0.1, multi=multi, names=["a.safetensors", "b.safetensors"])
    with pytest.raises(ValueError, match="9 concepts given"):
        load_concepts(model, [cat] * 9)
    assert not model.bank.active


def test_missing_or_corrupt_concept_file_and_base_model(model, tiny_v1, tmp_path):
    with pytest.raises(ConceptError, match="nope.safetensors: no such concept file"):
        load_concepts(model, [tmp_path / "nope.safetensors"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(concept_file("cat", 0).read_bytes()[:100])
    with pytest.raises(ConceptError, match="bad.safetensors: not a readable safetensors concept file"):
        load_concepts(model, [bad])
    with pytest.raises(ValueError, match="LatentDiffusion cannot take Perfusion concepts"):
        load_concepts(tiny_v1, [concept_file("cat", 0)])


def test_textual_inversion_concept_only_changes_the_placeholder_row(model, cat, dog):
    ti = replace(cat, method="embedding")
    loaded = load_concepts(model, [ti], 0.6, 0.15)
    assert not model.bank.active
    prompt = prepare_prompt(model.cond_stage_model.tokenizer, "a photo of a {}", loaded)
    set_gates(model, loaded, 0.5, 0.1)   # no gates to change: accepted, nothing happens
    encoder = model.cond_stage_model
    tokens = encoder.tokenize([prompt])
    rows = encoder.token_embedding(tokens)
    rows[tokens == loaded.token_ids[0]] = cat.embedding
    assert torch.equal(model.get_learned_conditioning([prompt]), encoder.encode_embeddings(tokens, rows))
    with pytest.raises(ValueError, match="cannot be combined"):
        load_concepts(model, [ti, dog])


def test_trained_keys_replace_the_locked_keys(model, cat, dog):
    keys = [torch.randn(k.out_features, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(model.bank.keys)]
    trained = replace(cat, method="trained_keys", o_star_k=keys)
    load_concepts(model, [trained, dog], 0.6, 0.15)
    locked_dog = [layer.weight @ dog.i_super for layer in model.bank.keys]
    for layer, k, d in zip(range(len(keys)), keys, locked_dog):
        assert torch.equal(model.bank.o_key[layer][0], k)
        assert torch.allclose(model.bank.o_key[layer][1], d, atol=1e-5)
    bad = replace(cat, method="trained_keys", o_star_k=keys[:-1])
    with pytest.raises(ConceptError, match="trained key outputs do not fit"):
        load_concepts(model, [bad])


def test_api_boundary_refuses_what_it_cannot_use(model, cat):
    one = load_concepts(model, concept_file("cat", 0))          # a single path is one concept
    assert len(one.concepts) == 1
    for betas in ("0.7", None, [0.7, "x"], True):
        with pytest.raises(ValueError, match="beta must be a number or a list of numbers"):
            load_concepts(model, [cat], betas=betas)
    with pytest.raises(ValueError, match="prompt must be text"):
        prepare_prompt(model.cond_stage_model.tokenizer, None, one)
    for kwargs, match in (({"height": 0}, "--H"), ({"width": 8.5}, "--W"), ({"steps": 0}, "steps"),
                          ({"scale": float("nan")}, "guidance scale")):
        with pytest.raises(ValueError, match=match):
            generate(model, ["a photo of a cat"], **{**SAMPLE, **kwargs})
    for prompts in ([], "a photo of a cat", [5]):
        with pytest.raises(ValueError, match="prompts must be a non-empty list"):
            generate(model, prompts, **SAMPLE)


def test_one_owner_for_the_loaded_state(model, cat, dog):
    first = load_concepts(model, [cat, dog], 0.6, 0.15, global_locking=True)
    state = model.bank.state
    assert set(state.rows) == set(first.token_ids) and state.global_locking
    assert [w for _, w in state.words.values()] == ["cat", "dog"]
    with pytest.raises(ValueError, match="beta has 3 values"):
        load_concepts(model, [cat], [0.5, 0.6, 0.7], 0.15)
    assert model.bank.state is state                    # a refused load leaves the loaded concepts as they were
    with model.bank.use(replace(state, global_locking=False)):
        assert not model.bank.global_locking and model.placeholder_rows is state.rows
    assert model.bank.state is state
    set_gates(model, first, 0.5, 0.2)
    assert first.state is model.bank.state and first.betas == [0.5, 0.5]
    second = load_concepts(model, [dog])
    with pytest.raises(ValueError, match="no longer loaded"):
        set_gates(model, first, 0.5, 0.2)
    prompt = prepare_prompt(model.cond_stage_model.tokenizer, "a photo of a {}", second)
    unload_concepts(model)
    with pytest.raises(ValueError, match="no longer loaded"):
        set_gates(model, second, 0.5, 0.2)
    with pytest.raises(ValueError, match="a concept that was unloaded"):
        generate(model, [prompt], **SAMPLE)
    assert model.placeholder_rows == {} and not model.bank.active and not model.bank.global_locking


def test_concept_files_with_bad_contents_are_refused_by_name(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(concept_file("cat", 0)), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    cases = {
        "unknown tensor 'o_star_v.x'": ({**tensors, "o_star_v.x": tensors["o_star_v.0"].clone()}, meta),
        "tensor embedding is torch.int64": ({**tensors, "embedding": tensors["embedding"].long()}, meta),
        "'fingerprints' must be a JSON object": (tensors, {**meta, "fingerprints": "[1, 2]"}),
        "'extra' is not JSON": (tensors, {**meta, "extra": "{"}),
    }
    for n, (match, (t, m)) in enumerate(cases.items()):
        path = tmp_path / f"c{n}.safetensors"
        save_file(t, str(path), metadata=m)
        with pytest.raises(ConceptError, match=f"c{n}.safetensors: .*{match}"):
            load_concept(path)


def test_joint_rule_warns_for_concepts_this_alike(model, cat, dog):
    """Two concepts whose i* nearly coincide (as one superclass's do): the joint rule warns, naming them
    and cond(G); the default rule does not."""
    twin = replace(cat, i_star=cat.i_star + 0.1 * (dog.i_star - cat.i_star))
    assert torch.linalg.cond(i_star_correlations([cat, dog], model.bank.C_inv)) < JOINT_COND_LIMIT
    corr = i_star_correlations([cat, twin], model.bank.C_inv)
    assert 1 - 1e-6 > corr[0, 1] and torch.linalg.cond(corr) > JOINT_COND_LIMIT
    with pytest.warns(PerfusionWarning, match=r"a.safetensors and b.safetensors: their i\* correlate at 0\.9\d+ "
                                              r"\(cond\(G\) \d+ > 10\); the joint rule"):
        load_concepts(model, [cat, twin], 0.7, 0.15, multi="joint", names=["a.safetensors", "b.safetensors"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_concepts(model, [cat, twin], 0.7, 0.15)
        load_concepts(model, [cat, dog], 0.7, 0.15, multi="joint")   # well-conditioned: no warning
    unload_concepts(model)


def test_prompts_must_be_prepared_for_the_loaded_concepts(model, cat, dog):
    """A template still holding {} and a prompt prepared for concepts since replaced are refused, by
    generate and by the gate table alike; a prompt stays valid across set_gates."""
    from ldm.perfusion.gates import gate_tables

    tokenizer = model.cond_stage_model.tokenizer
    loaded = load_concepts(model, [cat], 0.7, 0.15)
    with pytest.raises(ValueError, match=r"still names concepts with \{\}: pass it through prepare_prompt"):
        generate(model, ["a photo of a {}"], **SAMPLE)
    with pytest.raises(ValueError, match="still names concepts"):
        gate_tables(model, ["a photo of a {1}"])
    prompt = prepare_prompt(tokenizer, "a photo of a {}", loaded)
    set_gates(model, loaded, 0.6, 0.15)
    assert generate(model, [prompt], **SAMPLE).shape == (1, 3, 32, 32)
    load_concepts(model, [dog], 0.7, 0.15)   # the same placeholder word "sks", another concept
    with pytest.raises(ValueError, match="was prepared for concepts that are no longer loaded"):
        generate(model, [prompt], **SAMPLE)
    with pytest.raises(ValueError, match="was prepared for concepts that are no longer loaded"):
        gate_tables(model, [prompt])
    unload_concepts(model)
