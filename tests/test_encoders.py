"""Tests for the CLIP tokenizer and the frozen SD1 / SD2 text encoders (real tokenizer, tiny random weights)."""
import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn
from transformers import CLIPTextModel

from ldm.modules.encoders import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.tokenizer import CLIPTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "sd_state_dict_shapes.json"
SOT, EOT = 49406, 49407
PROMPTS = ["a photo of a teddy bear", "A  Photo of a * dog, on the beach!"]
TINY = dict(width=64, layers=2, heads=4)


def fixture_shapes(version):
    shapes = json.loads(FIXTURE.read_text())[version]
    prefix = "cond_stage_model."
    return {k[len(prefix):]: list(v) for k, v in shapes.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def sd1():
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(**TINY, intermediate_size=256)


@pytest.fixture(scope="module")
def sd2():
    torch.manual_seed(0)
    return FrozenOpenCLIPEmbedder(**TINY, embed_dim=32)


# ---------------------------------------------------------------- full-size names and shapes


@pytest.mark.parametrize("cls, version", [(FrozenCLIPEmbedder, "sd15"), (FrozenOpenCLIPEmbedder, "sd21")])
def test_default_state_dict_matches_checkpoint_layout(cls, version):
    with torch.device("meta"):
        enc = cls()
    ours = {k: list(v.shape) for k, v in enc.state_dict().items()}
    expected = fixture_shapes(version)
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    assert enc.max_length == 77
    assert enc.output_dim == (768 if version == "sd15" else 1024)


# ---------------------------------------------------------------- tokenizer


def test_known_token_ids():
    tok = CLIPTokenizer(pad_with_eot=True)
    assert tok.encode("a photo of a teddy bear") == [320, 1125, 539, 320, 11798, 4298]
    assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (SOT, EOT, 49408)
    # cleaning: case and repeated whitespace do not matter
    assert tok.encode("  A   PHOTO of a\tTeddy Bear ") == tok.encode("a photo of a teddy bear")


def test_padding_sd1_with_eot_sd2_with_zero():
    row1 = CLIPTokenizer(pad_with_eot=True)(["a photo"])[0]
    row2 = CLIPTokenizer(pad_with_eot=False)(["a photo"])[0]
    body = [SOT, 320, 1125, EOT]
    assert row1.shape == row2.shape == (77,)
    assert row1[:4].tolist() == row2[:4].tolist() == body
    assert (row1[4:] == EOT).all() and (row2[4:] == 0).all()
    assert CLIPTokenizer(pad_with_eot=True).pad_token_id == EOT
    assert CLIPTokenizer(pad_with_eot=False).pad_token_id == 0


def test_sd2_padding_matches_open_clip_tokenize():
    long_prompt = "a " + "very " * 100 + "long prompt"
    texts = PROMPTS + [long_prompt, ""]
    assert torch.equal(CLIPTokenizer(pad_with_eot=False)(texts), open_clip.tokenize(texts))


def test_truncation_keeps_eot_last():
    tok = CLIPTokenizer(pad_with_eot=True)
    rows = tok(["dog " * 200, "cat"])
    assert rows.shape == (2, 77)
    assert rows[0, 0] == SOT and rows[0, -1] == EOT
    assert (rows[0, 1:-1] == tok.encode("dog")[0]).all()
    assert rows[1, :3].tolist() == [SOT, 2368, EOT]
    short = CLIPTokenizer(max_length=5, pad_with_eot=False)(["a photo of a teddy bear"])
    assert short.tolist() == [[SOT, 320, 1125, 539, EOT]]


def test_multi_token_words_and_placeholders():
    tok = CLIPTokenizer(pad_with_eot=True)
    assert tok.token_count("teddy") == 1 and tok.token_count("teddy bear") == 2
    assert tok.token_count("sksdog") > 1
    # common placeholder strings that are single vocabulary entries
    for word in ["*", "sks", "ohwx", "@", "&"]:
        assert tok.token_count(word) == 1, word
    # ... and some that are not
    for word in ["S*", "<new1>", "V*", "<*>", "zwx"]:
        assert tok.token_count(word) > 1, word


def test_decode_round_trip():
    tok = CLIPTokenizer(pad_with_eot=False)
    row = tok(["a photo of a teddy bear"])[0]
    assert tok.decode(row) == "a photo of a teddy bear"
    assert tok.decode(tok.encode("a * dog")) == "a * dog"


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(max_length=1, pad_with_eot=True)
    with pytest.raises(TypeError, match="string"):
        CLIPTokenizer(pad_with_eot=True)([3])


# ---------------------------------------------------------------- tiny encoders


def test_encode_shape_and_contract(sd1, sd2):
    for enc in (sd1, sd2):
        out = enc.encode(PROMPTS)
        assert out.shape == (2, 77, 64) and enc.output_dim == 64 and enc.max_length == 77
        assert torch.equal(enc(PROMPTS), out)
        tokens = enc.tokenize(PROMPTS)
        assert tokens.dtype == torch.long and tokens.shape == (2, 77)
        assert torch.equal(tokens, enc.tokenizer(PROMPTS))
        assert isinstance(enc.token_embedding, nn.Embedding) and enc.token_embedding.weight.shape == (49408, 64)
    assert sd1.tokenizer.pad_token_id == EOT and sd2.tokenizer.pad_token_id == 0


def test_sd1_matches_hf_text_model(sd1):
    tokens = sd1.tokenize(PROMPTS)
    ours = sd1.encode(PROMPTS)
    with torch.no_grad():
        direct = sd1.transformer(input_ids=tokens).last_hidden_state
        eager = CLIPTextModel(sd1.transformer.config.__class__(
            **{**sd1.transformer.config.to_dict(), "attn_implementation": "eager"}))
        eager.load_state_dict(sd1.transformer.state_dict())
        eager_out = eager.eval()(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, eager_out, rtol=1e-5, atol=1e-5)


def open_clip_reference(model, tokens, n_blocks):
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in model.transformer.resblocks[:n_blocks]:
        x = block(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def test_sd2_penultimate_and_last_match_open_clip(sd2):
    tokens = sd2.tokenize(PROMPTS)
    with torch.no_grad():
        penultimate = open_clip_reference(sd2.model, tokens, n_blocks=1)
        last = open_clip_reference(sd2.model, tokens, n_blocks=2)
    assert sd2.layer == "penultimate"
    torch.testing.assert_close(sd2.encode(PROMPTS), penultimate, rtol=0, atol=1e-6)

    last_enc = FrozenOpenCLIPEmbedder(**TINY, embed_dim=32, layer="last")
    last_enc.load_state_dict(sd2.state_dict())
    torch.testing.assert_close(last_enc.encode(PROMPTS), last, rtol=0, atol=1e-6)
    assert not torch.allclose(penultimate, last, atol=1e-3)


def test_attention_is_causal(sd1, sd2):
    for enc in (sd1, sd2):
        a, b = enc.encode(["a photo of a dog", "a photo of a cat"])
        torch.testing.assert_close(a[:5], b[:5], rtol=0, atol=1e-6)  # SOT + "a photo of a"
        assert not torch.allclose(a[5], b[5], atol=1e-4)


def test_encode_embeddings_equals_encode_and_passes_gradient(sd1, sd2):
    for enc in (sd1, sd2):
        tokens = enc.tokenize(PROMPTS)
        embeds = enc.token_embedding(tokens)
        torch.testing.assert_close(enc.encode_embeddings(tokens, embeds), enc.encode(PROMPTS), rtol=0, atol=0)

        star = enc.tokenizer.encode("*")[0]
        is_placeholder = (tokens == star).unsqueeze(-1)
        assert is_placeholder.sum() == 1
        concept = nn.Parameter(torch.randn(64))
        out = enc.encode_embeddings(tokens, torch.where(is_placeholder, concept, embeds))
        assert out.requires_grad
        out.square().sum().backward()
        assert concept.grad is not None and concept.grad.abs().sum() > 0
        assert all(p.grad is None for p in enc.parameters())


def test_frozen_and_stays_in_eval(sd1, sd2):
    for enc in (sd1, sd2):
        assert all(not p.requires_grad for p in enc.parameters())
        parent = nn.ModuleDict({"cond_stage_model": enc, "other": nn.Dropout()})
        parent.train()
        assert parent.other.training
        assert not any(m.training for m in enc.modules())
        enc.train(True)
        assert not any(m.training for m in enc.modules())


def test_fingerprint_is_stable_and_weight_dependent(sd1):
    assert sd1.fingerprint() == sd1.fingerprint()
    other = FrozenCLIPEmbedder(**TINY, intermediate_size=256)
    assert other.fingerprint() != sd1.fingerprint()
    other.load_state_dict(sd1.state_dict())
    assert other.fingerprint() == sd1.fingerprint()


def test_a_prefix_of_the_tokens_encodes_as_the_whole_prompt_there(sd1, sd2):
    """The encoders are causal: Perfusion's targets encode prompts only up to the concept's token."""
    from ldm.modules.sdxl_conditioner import SDXLConditioner

    torch.manual_seed(0)
    sdxl = SDXLConditioner(clip=dict(TINY, intermediate_size=256), openclip=dict(TINY, embed_dim=32))
    for enc in (sd1, sd2, sdxl):
        tokens = enc.tokenize(PROMPTS)
        whole = enc.encode_embeddings(tokens, enc.token_embedding(tokens))
        for n in (1, 6, 77):
            prefix = enc.encode_embeddings(tokens[:, :n], enc.token_embedding(tokens[:, :n]))
            torch.testing.assert_close(prefix, whole[:, :n], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(whole[:, 5], whole[:, 6], atol=1e-3)   # positions differ: the check has teeth


def test_encode_embeddings_rejects_wrong_shapes(sd1, sd2):
    for enc in (sd1, sd2):
        tokens = enc.tokenize(["a"])
        too_long = torch.cat([tokens, tokens[:, :1]], 1)
        with pytest.raises(ValueError, match="tokens must have shape"):
            enc.encode_embeddings(too_long, enc.token_embedding(too_long))
        with pytest.raises(ValueError, match="token embeddings must have shape"):
            enc.encode_embeddings(tokens[:, :10], enc.token_embedding(tokens))
        with pytest.raises(ValueError, match="token embeddings must have shape"):
            enc.encode_embeddings(tokens, torch.zeros(1, 77, 32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="layer must be one of"):
        FrozenOpenCLIPEmbedder(**TINY, layer="middle")
    with pytest.raises(ValueError, match="vocab_size"):
        FrozenCLIPEmbedder(**TINY, vocab_size=1000)


def test_meta_built_encoders_work_after_loading(sd1, sd2):
    """Non-persistent buffers (position ids, causal mask) are not used, so meta + to_empty + load is enough."""
    for enc, build in ((sd1, lambda: FrozenCLIPEmbedder(**TINY, intermediate_size=256)),
                       (sd2, lambda: FrozenOpenCLIPEmbedder(**TINY, embed_dim=32))):
        with torch.device("meta"):
            fresh = build()
        fresh = fresh.to_empty(device="cpu")
        fresh.load_state_dict(enc.state_dict())
        torch.testing.assert_close(fresh.encode(PROMPTS), enc.encode(PROMPTS), rtol=0, atol=0)
