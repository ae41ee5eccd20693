"""PerfusionLatentDiffusion: what trains, key-locking, initialisation, concept files, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.build import load_config
from ldm.perfusion.concepts import ConceptError, load_concept
from ldm.util import instantiate_from_config
from tests.conftest import ROOT, perfusion_batch, tiny_perfusion_model


@pytest.fixture(scope="module")
def model():
    return tiny_perfusion_model()


def _train_steps(model, n=2, seed=0):
    model.train()
    opt = model.configure_optimizers()
    for i in range(n):
        torch.manual_seed(seed + i)
        loss = model.shared_step(perfusion_batch(model, seed=seed + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss


def test_exactly_embedding_and_value_outputs_train(model):
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"embedding"} | {f"o_star_v.{i}" for i in range(7)}


@pytest.mark.parametrize("config,layers", [("perfusion_teddy.yaml", 16), ("perfusion_teddy_sd_v2.yaml", 16)])
def test_full_size_trainable_set(config, layers):
    cfg = load_config([ROOT / "configs" / config])
    with torch.device("meta"):
        m = instantiate_from_config(cfg.model)
    trainable = {n: tuple(p.shape) for n, p in m.named_parameters() if p.requires_grad}
    assert set(trainable) == {"embedding"} | {f"o_star_v.{i}" for i in range(layers)}
    assert trainable["embedding"] == ((768,) if "v2" not in config else (1024,))


def test_training_changes_the_concept_and_nothing_else():
    m = tiny_perfusion_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _train_steps(m, n=2)
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    concept = {"embedding", "i_star", "i_super", "initialized"} | {f"o_star_v.{i}" for i in range(7)}
    assert changed == concept


def test_a_training_step_encodes_the_concept_prompts_once_with_the_same_result(monkeypatch):
    """With the targets over the images' captions, the concept prompts are encoded once per step (the
    targets' EMA reads them detached), and the step is what encoding them separately for the targets
    gave: the same loss and concept."""
    results = []
    for once in (True, False):
        m = tiny_perfusion_model("model.params.target_templates=captions")
        m.ensure_covariance()   # estimated from captions once, before the counting starts
        encoder = m.cond_stage_model
        calls = []
        original = type(encoder).encode_embeddings
        monkeypatch.setattr(encoder, "encode_embeddings",
                            lambda *a, **k: calls.append(1) or original(encoder, *a, **k))
        if not once:   # the targets get their own encoding, as before
            update = m.update_targets
            monkeypatch.setattr(m, "update_targets", lambda c, s, encodings=None: update(c, s))
        loss = _train_steps(m, n=2)
        results.append((loss.item(), m.embedding.detach().clone(), m.i_star.clone(), len(calls)))
    (loss_a, emb_a, istar_a, calls_a), (loss_b, emb_b, istar_b, calls_b) = results
    assert calls_a == 4 and calls_b == 6     # per step: the concept and the superclass prompts (before: +1)
    # the separate encoding reads a prefix of each prompt (the encoder is causal): equal up to float rounding
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert torch.allclose(emb_a, emb_b, atol=1e-6) and torch.allclose(istar_a, istar_b, atol=1e-6)


def test_targets_average_the_target_templates_not_the_captions(tmp_path):
    """i* and i_super are read at the concept word of the target templates, taken in turn; the images'
    captions only reach the loss."""
    from ldm.data.templates import fill

    file = tmp_path / "templates.txt"
    file.write_text("# comment\na {} in the snow\n\na {} on a table\na cropped photo of a {}\n")
    m = tiny_perfusion_model(f"model.params.target_templates={file}")
    assert m.target_templates == ["a {} in the snow", "a {} on a table", "a cropped photo of a {}"]
    prompts, supers = m.template_targets(4, step=0)   # in turn, wrapping round
    assert m.template_targets(2, step=1)[0] == prompts[2:]   # step 1 goes on where step 0 stopped
    assert prompts == [fill(t, m.placeholder) for t in m.target_templates + m.target_templates[:1]]
    torch.manual_seed(0)
    m.shared_step(perfusion_batch(m, n=2))   # step 0, the first batch: templates 0 and 1
    enc = m.cond_stage_model
    sup = enc.encode(supers[:2])
    pos = [enc.tokenize([c])[0].tolist().index(m.superclass_ids[-1]) for c in supers[:2]]
    assert torch.allclose(m.i_super, torch.stack([sup[i, p] for i, p in enumerate(pos)]).mean(0), atol=1e-5)
    captions = tiny_perfusion_model("model.params.target_templates=captions")
    assert captions.target_templates is None


@pytest.mark.parametrize("value,message", [
    ([], "must be a non-empty list of templates"),
    (["a photo of a {}", "no placeholder"], "with one '{}' each"),
    ("missing-templates.txt", "cannot read missing-templates.txt"),
    ("a photo of a {}", "is one template; give a list"),
    (5, "must be a non-empty list of templates"),
])
def test_bad_target_templates_are_one_line_errors(value, message):
    from ldm.errors import UserError
    from ldm.perfusion.model import _target_templates

    with pytest.raises(UserError, match=message):
        _target_templates(value)


def test_first_batch_initialises_targets(model):
    m = tiny_perfusion_model()
    batch = perfusion_batch(m)
    with torch.no_grad():
        m.update_targets(batch["caption"], batch["caption_super"])
    enc = m.cond_stage_model
    assert torch.equal(m.embedding.detach(), enc.token_embedding.weight[m.superclass_ids].mean(0))
    # i_super: encoding at the superclass word's position in the superclass prompts, batch mean
    sup = enc.encode(batch["caption_super"])
    pos = [enc.tokenize([c])[0].tolist().index(m.superclass_ids[-1]) for c in batch["caption_super"]]
    expected = torch.stack([sup[i, p] for i, p in enumerate(pos)]).mean(0)
    assert torch.allclose(m.i_super, expected, atol=1e-6)
    for o_v, layer in zip(m.o_star_v, m.bank.values):
        assert torch.allclose(o_v, layer.weight @ m.i_super, atol=1e-6)
    # With the initial embedding equal to the superclass's, i* equals i_super for a one-token superclass.
    assert torch.allclose(m.i_star, m.i_super, atol=1e-5)


def test_key_locking_and_gate_at_the_target_input(model):
    m = tiny_perfusion_model()
    _train_steps(m, n=1)
    m.activate_training_concept(beta=0.6, tau=0.15)
    key, value = m.bank.keys[3], m.bank.values[3]
    with torch.no_grad():
        gate = 1 / (1 + math.exp(-(1 - 0.6) / 0.15))
        k = key(m.i_star[None, None])
        v = value(m.i_star[None, None])
    assert torch.allclose(k[0, 0], gate * (key.weight @ m.i_super), atol=1e-5)
    assert torch.allclose(v[0, 0], gate * m.o_star_v[3], atol=1e-5)


def test_gradients_reach_the_embedding_but_not_i_star(model):
    m = tiny_perfusion_model()
    m.train()
    loss = m.shared_step(perfusion_batch(m))
    loss.backward()
    assert m.embedding.grad is not None and m.embedding.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.o_star_v)
    assert not m.i_star.requires_grad and m.i_star.grad is None
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)


def test_no_concept_is_bit_identical_to_base(model, tiny_v1):
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 600])
    c = tiny_v1.get_learned_conditioning(["a photo of a cat", "a dog"])
    model.bank.clear()
    with torch.no_grad():
        assert torch.equal(model.apply_model(x, t, c), tiny_v1.apply_model(x, t, c))
        assert torch.equal(model.get_learned_conditioning(["a photo of a *"]),
                           tiny_v1.get_learned_conditioning(["a photo of a *"]))


def test_multi_token_superclass():
    m = tiny_perfusion_model("model.params.superclass=teddy bear")
    assert len(m.superclass_ids) == 2
    batch = perfusion_batch(m)
    with torch.no_grad():
        m.update_targets(batch["caption"], batch["caption_super"])
    enc = m.cond_stage_model
    sup = enc.encode(batch["caption_super"])
    bear = m.superclass_ids[-1]
    pos = [enc.tokenize([c])[0].tolist().index(bear) for c in batch["caption_super"]]
    assert torch.allclose(m.i_super, torch.stack([sup[i, p] for i, p in enumerate(pos)]).mean(0), atol=1e-6)


def test_concept_file_round_trip_and_size(model, tmp_path):
    m = tiny_perfusion_model()
    _train_steps(m, n=1)
    path = m.save_concept(tmp_path / "c.safetensors")
    concept = load_concept(path)
    assert torch.equal(concept.embedding, m.embedding.detach())
    assert len(concept.o_star_v) == 7
    assert concept.placeholder == "*" and concept.superclass == "cat"
    assert set(concept.fingerprints) == {"unet", "text_encoder", "covariance"} and all(concept.fingerprints.values())
    floats = 64 * 3 + sum(p.numel() for p in m.o_star_v)
    assert floats * 4 < path.stat().st_size < floats * 4 + 2048


def test_weight_decay_is_a_setting_off_by_default():
    """AdamW's decay: 0 unless model.params.weight_decay says otherwise, and then it shrinks what it trains."""
    assert all(g["weight_decay"] == 0.0 for g in tiny_perfusion_model().configure_optimizers().param_groups)
    m = tiny_perfusion_model("model.params.weight_decay=0.5")
    opt = m.configure_optimizers()
    assert all(g["weight_decay"] == 0.5 for g in opt.param_groups)
    with torch.no_grad():
        m.o_star_v[0].fill_(1.0)
    m.o_star_v[0].grad = torch.zeros_like(m.o_star_v[0])
    opt.step()   # no gradient: only the decay moves it, by lr * weight_decay
    assert torch.allclose(m.o_star_v[0], torch.full_like(m.o_star_v[0], 1 - m.lr_o_v * 0.5))


@pytest.mark.parametrize("override,match", [
    ("model.params.weight_decay=-0.1", "weight_decay must be >= 0"),
    ("model.params.covariance_max_captions=0", "covariance_max_captions must be a whole number >= 1"),
    ("model.params.placeholder=sksdog", "must be exactly one"),
    ("model.params.superclass=zxqv", "not a known word"),
    ("model.params.superclass=''", "is empty"),
])
def test_bad_placeholder_or_superclass(override, match):
    with pytest.raises(ValueError, match=match):
        tiny_perfusion_model(override)


def test_template_without_placeholder(model):
    m = tiny_perfusion_model("model.params.target_templates=captions")   # the targets read the captions
    batch = perfusion_batch(m)
    batch["caption"][1] = "a photo of a cat"
    with pytest.raises(ValueError, match="not found in prompt 'a photo of a cat'"):
        m.shared_step(batch)


def test_covariance_of_another_text_encoder_is_refused(tmp_path):
    from ldm.perfusion.covariance import save_covariance

    path = tmp_path / "cov.safetensors"
    save_covariance(path, torch.eye(64, dtype=torch.float64), {"text_encoder_fingerprint": "0123456789abcdef"})
    m = tiny_perfusion_model(f"model.params.covariance_path={path}")
    with pytest.raises(ValueError, match="was made for text encoder 0123456789abcdef"):
        m.ensure_covariance()


def test_nan_loss_stops_and_never_reaches_a_concept_file(tmp_path):
    m = tiny_perfusion_model()
    _train_steps(m, n=1)
    good = m.save_concept(tmp_path / "last.safetensors").read_bytes()
    with torch.no_grad():
        m.o_star_v[0].fill_(float("nan"))
    m.train()
    with pytest.raises(FloatingPointError, match="loss became NaN or infinite at step 0"):
        m.shared_step(perfusion_batch(m))
    # while fitting, the flag stays on the device until the optimizer step (the forward never waits for it)
    m.on_fit_start()
    m.shared_step(perfusion_batch(m))
    with pytest.raises(FloatingPointError, match="loss became NaN or infinite"):
        m.on_before_optimizer_step(None)
    with pytest.raises(ConceptError, match="NaN"):
        m.save_concept(tmp_path / "last.safetensors")
    assert (tmp_path / "last.safetensors").read_bytes() == good


@pytest.mark.parametrize("method,learned", [
    ("trained_keys", {"embedding"} | {f"o_star_v.{i}" for i in range(7)} | {f"o_star_k.{i}" for i in range(7)}),
    ("embedding", {"embedding"} | {f"o_star_v.{i}" for i in range(7)}),   # o*_V: set once, never trained
])
def test_ablation_methods_train_their_own_parameters(method, learned, tmp_path):
    m = tiny_perfusion_model(f"model.params.method={method}")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    _train_steps(m, n=2)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == learned | {"i_star", "i_super", "initialized"}
    concept = load_concept(m.save_concept(tmp_path / "c.safetensors"))
    assert concept.method == method
    if method == "trained_keys":
        assert [torch.equal(k, p.detach()) for k, p in zip(concept.o_star_k, m.o_star_k)] == [True] * 7
        locked = [layer.weight @ m.i_super for layer in m.bank.keys]
        assert all(not torch.allclose(k, lk) for k, lk in zip(concept.o_star_k, locked))
    else:
        assert concept.o_star_k is None and not m.bank.active   # textual inversion: the edit stays off
        assert [p.requires_grad for p in m.o_star_v] == [False] * 7


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of perfusion, trained_keys, embedding"):
        tiny_perfusion_model("model.params.method=lora")


def test_gate_rules_change_what_training_learns():
    """The same two steps from the same start: "all_detached" and "concept" learn other embeddings than
    Eq. 3 everywhere ("all"), since sim(e) at the other tokens no longer feeds the gradient."""
    learned = {}
    for rule in ("all", "all_detached", "concept"):
        m = tiny_perfusion_model(f"model.params.gate_at={rule}")
        _train_steps(m, n=2)
        learned[rule] = m.embedding.detach().clone()
    assert not torch.allclose(learned["all"], learned["all_detached"])
    assert not torch.allclose(learned["all"], learned["concept"])
    with pytest.raises(ValueError, match="gate_at must be one of"):
        tiny_perfusion_model("model.params.gate_at=somewhere")


def test_estimated_covariance_is_identified_by_its_source_not_its_last_bits():
    threads = torch.get_num_threads()
    fingerprints = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            m = tiny_perfusion_model()
            m.ensure_covariance()
            fingerprints.append(m.fingerprints()["covariance"])
    finally:
        torch.set_num_threads(threads)
    assert fingerprints[0] == fingerprints[1]
    other = tiny_perfusion_model("model.params.covariance_max_captions=200")
    other.ensure_covariance()
    assert other.fingerprints()["covariance"] != fingerprints[0]


def test_a_full_disk_while_saving_names_the_file_and_leaves_nothing(tmp_path):
    """A real write failure inside safetensors (a file-size limit: the kernel refuses the write, as a full disk
    does) becomes one line naming the concept file; the earlier file and no temporary one remain."""
    import subprocess
    import sys

    target = tmp_path / "concept.safetensors"
    target.write_bytes(b"the previous concept")
    script = f"""
import resource, signal, torch
from safetensors.torch import save_file
from ldm.cli import run_cli
from ldm.util import atomic_path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
def main():
    with atomic_path({str(target)!r}) as tmp:
        save_file({{"x": torch.zeros(100000)}}, str(tmp))
    return 0
run_cli(main)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: {target}: File too large"
    assert target.read_bytes() == b"the previous concept" and sorted(tmp_path.iterdir()) == [target]


class _HostReads:
    """Inside the block, records every read of a tensor's values on the host that would wait for a GPU:
    a tensor as a Python number or bool (aten::_local_scalar_dense), ops whose output size depends on values
    (nonzero, masked_select, unique) and tolist/numpy/cpu, except on tensors that live on the host by design
    (`host_by_design`: on a CPU-only machine host and device tensors cannot be told apart)."""

    WAITING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique")

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self.reads = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import inspect

                if any(name in str(func) for name in _HostReads.WAITING_OPS) and \
                        not any(_HostReads.host_by_design(frame) for frame in inspect.stack()[1:8]):
                    reads.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        for name in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, name)

            def patched(t, *args, _original=original, _name=name, **kwargs):
                import inspect

                if not _HostReads.host_by_design(inspect.stack()[1]):
                    reads.append(_name)
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, patched)

    @staticmethod
    def host_by_design(frame) -> bool:
        """The tokenizer's tokens, the samplers' schedules (from `host_alphas_cumprod`) and the finished images."""
        where = (frame.filename.replace("\\", "/").rsplit("/", 1)[-1], frame.function)
        return where in {("model.py", "_concept_positions"), ("ddim.py", "sample"), ("euler.py", "sample"),
                         ("euler.py", "start"), ("euler.py", "sigma_to_t"), ("dpm_solver.py", "sample"),
                         ("sample.py", "generate")}

    def __enter__(self):
        self.mode.__enter__()
        return self.reads

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("config", ["configs/tiny/perfusion-tiny.yaml", "configs/tiny/perfusion-sdxl-tiny.yaml"])
def test_training_and_sampling_forward_never_wait_for_the_device(config, monkeypatch, tmp_path):
    """A fitting step's forward (after the first, which sets the concept up) and a sampling run read no
    device tensor on the host: on a GPU neither waits for the device (CUDA's own check where one exists)."""
    from ldm.build import build_model
    from ldm.perfusion.inference import load_concepts
    from ldm.perfusion.prompts import prepare_prompt
    from ldm.sample import generate

    m = build_model(load_config([str(ROOT / config)]), seed=0).train()
    m.cache_latents = True
    m.on_fit_start()
    batch = perfusion_batch(m)
    batch["key"] = [str(i) for i in range(len(batch["caption"]))]
    m.shared_step(batch).backward()
    m.on_before_optimizer_step(None)
    with _HostReads(monkeypatch) as reads:
        loss = m.shared_step(batch)
    assert reads == [] and loss.isfinite()
    loaded = load_concepts(m.eval(), [m.save_concept(tmp_path / "c.safetensors")] * 1, 0.7, 0.15)
    prompt = prepare_prompt(m.cond_stage_model.tokenizer, "a photo of a {}", loaded)
    for sampler in ("ddim", "euler", "dpmpp_2m") if "sdxl" not in config else ("ddim",):
        with _HostReads(monkeypatch) as reads:
            generate(m, [prompt], sampler=sampler, steps=2, scale=4.0, height=32, width=32, seed=0)
        assert reads == [], sampler
    with _HostReads(monkeypatch) as reads:   # the guard itself works
        bool(torch.ones(1)), torch.ones(2).tolist()
    assert reads == ["aten._local_scalar_dense.default", "tolist"]
    if torch.cuda.is_available():
        m.cuda()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m.shared_step({k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()})
            generate(m, [prompt], steps=3, scale=4.0, height=32, width=32, seed=0)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_gradient_checkpointing_gives_the_same_step():
    """The rank-1 parts computed once per step (outside the U-Net's checkpointed blocks) give the same loss
    and gradients with gradient checkpointing as without."""
    from ldm.build import build_model

    results = []
    for checkpointing in ("false", "true"):
        config = load_config([str(ROOT / "configs/tiny/perfusion-tiny.yaml")],
                             [f"model.params.unet_config.params.use_checkpoint={checkpointing}"])
        m = build_model(config, seed=0).train()
        m.on_fit_start()
        batch = perfusion_batch(m)
        torch.manual_seed(0)
        m.shared_step(batch)   # the first step sets the concept up
        torch.manual_seed(1)
        loss = m.shared_step(batch)
        loss.backward()
        results.append((loss.item(), m.embedding.grad.clone(), [p.grad.clone() for p in m.o_star_v]))
    (loss_a, emb_a, o_a), (loss_b, emb_b, o_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and torch.allclose(emb_a, emb_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(o_a, o_b)) and emb_a.abs().sum() > 0
