"""The toy world's pretraining command: latent-scale folding, the text encoder's pretraining on
captions and its loading, frozen, into the LatentDiffusion, the localization loss, and a 1-step end-to-end run of `python -m ldm.toy.pretrain` whose weights load into the toy config."""
from __future__ import annotations

import pytest
import torch

from ldm.build import build_model, load_config
from ldm.perfusion.covariance import load_covariance
from ldm.toy.localized import LocalizedLatentDiffusion
from ldm.toy.pretrain import main as pretrain_main
from ldm.toy.pretrain import normalize_latent_scale
from ldm.util import instantiate_from_config
from tests.conftest import ROOT

pytestmark = pytest.mark.slow   # Lightning training runs


def test_latent_scale_folding_is_exact():
    torch.manual_seed(0)
    vae = instantiate_from_config(load_config([ROOT / "configs/toy/autoencoder.yaml"]).model)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before, z0 = vae.decode(vae.encode(x).mode()), vae.encode(x).mode()
        s = normalize_latent_scale(vae, x)
        after, z1 = vae.decode(vae.encode(x).mode()), vae.encode(x).mode()
    assert torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(z1, s * z0, atol=1e-5)
    assert abs(float(z1.std()) - 1.0) < 1e-4


def test_text_encoder_trains_when_asked():
    config = load_config([ROOT / "configs/toy/model.yaml"], ["model.params.cond_stage_trainable=true"])
    model = instantiate_from_config(config.model)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model", "cond_stage_model"}
    in_optimizer = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    assert id(model.cond_stage_model.token_embedding.weight) in in_optimizer


def test_pretrain_command_end_to_end(tmp_path):
    out, logs = tmp_path / "ckpt", tmp_path / "logs"
    code = pretrain_main(["--out", str(out), "--logdir", str(logs), "--covariance_captions", "64",
                          "lightning.trainer.max_steps=1", "data.num_workers=0"])
    assert code == 0
    weights = out / "toy-ldm.safetensors"
    assert weights.stat().st_size < 25 * 2**20
    model = build_model(load_config([ROOT / "configs/toy/ldm.yaml"]), ckpt=weights)
    _, _, meta = load_covariance(out / "covariance.safetensors")
    assert meta["text_encoder_fingerprint"] == model.cond_stage_model.fingerprint()


def test_pretrain_resumes_an_interrupted_stage(tmp_path):
    out, logs = tmp_path / "ckpt", tmp_path / "logs"
    tiny = ["lightning.trainer.max_steps=1", "data.num_workers=0", "lightning.callbacks.checkpoint.every_n_steps=1"]
    assert pretrain_main(["--out", str(out), "--logdir", str(logs), "--covariance_captions", "64", *tiny]) == 0
    (logs / "toy-ldm-trained.safetensors").unlink()   # as if the LatentDiffusion stage had been interrupted after step 1
    (run,) = logs.glob("*_toy-ldm")
    vae_bytes = (logs / "toy-autoencoder.safetensors").read_bytes()
    longer = [t.replace("max_steps=1", "max_steps=2") for t in tiny]
    assert pretrain_main(["--out", str(out), "--logdir", str(logs), "--covariance_captions", "64", "--resume",
                          *longer]) == 0
    assert (logs / "toy-autoencoder.safetensors").read_bytes() == vae_bytes    # the finished stage: skipped
    assert list(logs.glob("*_toy-ldm")) == [run] and len(list((run / "configs").glob("*-config.yaml"))) == 2
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert (logs / "toy-ldm-trained.safetensors").is_file()


def test_prompt_accuracy_runs_the_scorer_on_generated_images(tiny_v1):
    from ldm.build import build_model
    from ldm.toy.evaluate import prompt_accuracy
    from ldm.toy.scorer import Scorer
    from ldm.toy.world import held_out_scenes

    model = build_model(load_config([ROOT / "configs/toy/ldm.yaml"]), seed=0)
    scenes = held_out_scenes()[:3]
    acc = prompt_accuracy(model, Scorer.load(ROOT / "ckpt/toy/scorer.safetensors"), scenes, steps=2)
    assert {"shape", "colour", "position", "overall"} <= set(acc)
    assert all(0.0 <= v <= 1.0 for v in acc.values() if v == v)   # NaN: attribute not asked for


def _localized_model():
    config = load_config([ROOT / "configs/toy/ldm.yaml"])
    torch.manual_seed(0)
    return instantiate_from_config(config.model)


def test_localization_assigns_each_word_to_its_object():
    model = _localized_model()
    caption = "on a black background, on the left a red and green striped star and on the right a blue circle"
    rows, objects, positions = model.word_slots([caption, ""])
    ids = model.cond_stage_model.tokenize([caption])[0]
    words = [model.cond_stage_model.tokenizer.decode([int(ids[p])]).strip() for p in positions]
    assert rows.tolist() == [0] * 8            # the empty caption has no localized word
    assert list(zip(words, objects.tolist())) == [
        ("left", 0), ("red", 0), ("green", 0), ("striped", 0), ("star", 0),
        ("right", 1), ("blue", 1), ("circle", 1)]
    assert not {"black", "background"} & set(words)


def test_localization_loss_rewards_attention_inside_the_mask():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :, :2] = 1                     # object 0: the left half
    slots = (torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    inside, outside = torch.zeros(1, 1, 16, 3), torch.zeros(1, 1, 16, 3)
    inside[0, 0, masks[0, 0].flatten() > 0, 1] = 1
    outside[0, 0, masks[0, 0].flatten() == 0, 1] = 1
    loss = LocalizedLatentDiffusion.localization_loss
    assert float(loss([inside], masks, slots)) == -1.0 and float(loss([outside], masks, slots)) == 1.0


def test_localization_trains_the_unet_only():
    model = _localized_model()
    from ldm.toy.dataset import ToyCaptionDataset

    data = ToyCaptionDataset(4, seed=0, masks=True)
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    model.train()
    loss = model.shared_step(batch)
    loss.backward()
    assert all(p.grad is None for p in model.cond_stage_model.parameters())
    assert model.model.diffusion_model.input_blocks[0][0].weight.grad is not None
    in_optimizer = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    assert id(model.cond_stage_model.token_embedding.weight) not in in_optimizer


def test_text_encoder_pretraining_reads_each_object_at_its_noun(tmp_path):
    from safetensors.torch import save_file

    from ldm.toy.text_encoder import HEADS, NO_OBJECT, ToyCaptionLabels, object_labels
    from ldm.toy.world import SceneObject

    data = ToyCaptionLabels(64, seed=0, p_textured=0.3)
    item = data[0]
    _, request = data.scene(0)
    assert "image" not in item and item["caption"].endswith(request.objects[-1].shape)   # the noun comes last
    if len(request.objects) == 1:
        assert (item["labels"][1] == NO_OBJECT).all()
    # a textured object: both colours and the pattern; an unsaid attribute is its own, last class
    assert object_labels(SceneObject("star", None, "left", texture=("stripes", "red", "green"))) == [3, 0, 3, 0, 0]
    assert object_labels(SceneObject("circle", None, None)) == [0, 7, 7, 3, 5] and len(HEADS) == 5

    torch.manual_seed(0)
    model = instantiate_from_config(load_config([ROOT / "configs/toy/text_encoder.yaml"]).model)
    batch = torch.utils.data.default_collate([data[i] for i in range(64)])
    optimizer, loss = model.configure_optimizers(), lambda: sum(model.losses(batch).values())
    first = float(loss())
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss()) < 0.5 * first
    # stage 3 loads the trained encoder, frozen, into the LatentDiffusion
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "text.safetensors"))
    ldm = instantiate_from_config(load_config([ROOT / "configs/toy/ldm.yaml"],
                                              [f"model.params.cond_stage_ckpt={tmp_path / 'text.safetensors'}"]).model)
    assert ldm.cond_stage_model.fingerprint() == model.cond_stage_model.fingerprint()
    assert not any(p.requires_grad for p in ldm.cond_stage_model.parameters())


def test_tail_spread_measures_only_the_end_and_padding_tokens():
    from ldm.perfusion.covariance import first_eot
    from ldm.toy.text_encoder import ToyCaptionLabels, tail_spread

    torch.manual_seed(0)
    model = instantiate_from_config(load_config([ROOT / "configs/toy/text_encoder.yaml"]).model)
    assert model.tail_weight > 0
    eot = model.cond_stage_model.tokenizer.eot_token_id
    tokens = model.cond_stage_model.tokenize(["on the left a red star", "at the top a blue and green striped ring"])
    end = first_eot(tokens, eot)
    assert tokens[0, end[0]] == eot and tokens[0, end[0] - 1] != eot
    hidden = torch.zeros(2, tokens.shape[1], 4)
    hidden[0, 1] = 5.0                                  # a word: not the tail's business
    assert float(tail_spread(hidden, tokens, eot)) == 0
    hidden[1, end[1]] = 1.0                             # one end token differs from the others
    assert float(tail_spread(hidden, tokens, eot)) > 0
    # the stage's loss carries the term, and training lowers it
    data = ToyCaptionLabels(32, seed=0)
    batch = torch.utils.data.default_collate([data[i] for i in range(32)])
    optimizer = model.configure_optimizers()
    with torch.no_grad():
        first = float(model.losses(batch)["tail"])
    for _ in range(20):
        optimizer.zero_grad()
        sum(model.losses(batch).values()).backward()
        optimizer.step()
    with torch.no_grad():
        assert float(model.losses(batch)["tail"]) < 0.5 * first


def test_shipped_text_encoder_says_nothing_at_the_end_of_a_prompt():
    """Eq. 3 reads the end token of a prompt that ends with the concept as the concept unless the
    encoder's tail is content-free; the shipped toy encoder was pretrained so (tail_weight)."""
    from ldm.toy.text_encoder import ToyCaptionLabels, end_token_sim

    ldm = build_model(load_config([ROOT / "configs/toy/model.yaml"]), ckpt=ROOT / "ckpt/toy/toy-ldm.safetensors")
    _, C_inv, _ = load_covariance(ROOT / "ckpt/toy/covariance.safetensors")
    heldout = ToyCaptionLabels(200, seed=1000, split="heldout")
    sim = end_token_sim(ldm.cond_stage_model, [heldout[i]["caption"] for i in range(200)], C_inv)
    assert float(sim.abs().median()) < 0.05 and float(sim.abs().max()) < 0.2
