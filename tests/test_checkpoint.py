"""Checkpoint files: round trips through both formats, and every bad input refused with one clear line."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.build import build_model, load_config
from ldm.checkpoint import CheckpointError, check_compatible, load_model, normalize_keys, read_state_dict
from ldm.util import instantiate_from_config
from tests.conftest import ROOT, TINY_V1


def _output(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([321]), model.get_learned_conditioning(["a red cube"]))


@pytest.mark.parametrize("fmt", ["ckpt", "ckpt-wrapped", "safetensors"])
def test_save_then_load_gives_identical_outputs(tiny_v1, tmp_path, fmt):
    state = {k: v.contiguous() for k, v in tiny_v1.state_dict().items()}
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "model.ckpt")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 7} if fmt == "ckpt-wrapped" else state, path)
    fresh = build_model(load_config([TINY_V1]), ckpt=path, seed=123)
    assert torch.equal(_output(fresh), _output(tiny_v1))


def test_real_checkpoint_variants_are_normalized(tiny_v1, tmp_path):
    """text_model.* names, position_ids, schedule buffers and EMA copies, as real SD files carry them."""
    state = {}
    for k, v in tiny_v1.state_dict().items():
        state[k.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.")] = v
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["betas"] = tiny_v1.betas.clone()
    state["alphas_cumprod"] = tiny_v1.alphas_cumprod.clone()
    ema = {n: p.detach() + 1.0 for n, p in tiny_v1.named_parameters() if n.startswith("model.")}
    state.update({"model_ema." + n[len("model."):].replace(".", ""): v for n, v in ema.items()})
    state["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "real.ckpt"
    torch.save({"state_dict": state}, path)

    plain = build_model(load_config([TINY_V1]), ckpt=path)
    assert torch.equal(_output(plain), _output(tiny_v1))
    with_ema = build_model(load_config([TINY_V1]), ckpt=path, use_ema=True)
    name = "model.diffusion_model.out.2.bias"
    assert torch.equal(with_ema.state_dict()[name], ema[name])


def test_other_schedule_is_refused(tiny_v1, tmp_path):
    state = dict(tiny_v1.state_dict(), betas=torch.linspace(1e-4, 0.02, 1000))
    path = tmp_path / "other_schedule.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="noise schedule"):
        build_model(load_config([TINY_V1]), ckpt=path)


def _one_line(err: pytest.ExceptionInfo, path: Path):
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    path = tmp_path / "absent.ckpt"
    with pytest.raises(CheckpointError, match="no such file") as err:
        read_state_dict(path)
    _one_line(err, path)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory") as err:
        read_state_dict(tmp_path)
    _one_line(err, tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(tiny_v1, tmp_path, suffix):
    path = tmp_path / f"full{suffix}"
    state = {k: v.contiguous() for k, v in tiny_v1.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_state_dict(path)
    _one_line(err, path)


def test_text_file(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("<html>404 Not Found</html>\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as err:
        read_state_dict(path)
    _one_line(err, path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}
    if container == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="refused to unpickle") as err:
        read_state_dict(path)
    _one_line(err, path)
    assert not marker.exists()


def test_checkpoint_of_the_other_tiny_version(tiny_v2, tmp_path):
    path = tmp_path / "v2.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_v2.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        build_model(load_config([TINY_V1]), ckpt=path)
    message = _one_line(err, path)
    assert "missing" in message and "unexpected" in message
    assert "SD 2.x checkpoint but the config is SD 1.x" in message


def test_real_sd2_names_against_sd1_config_hint(sd_shapes):
    """The full-size check, without weights: the SD 2.1 fixture's shapes against the v1 config."""
    with torch.device("meta"):
        model = instantiate_from_config(load_config([ROOT / "configs/stable-diffusion/v1-inference.yaml"]).model)
        found = {k: torch.empty(v) for k, v in sd_shapes["sd21"].items()}
    with pytest.raises(CheckpointError) as err:
        check_compatible(model.state_dict(), normalize_keys(found), "v2-1_512-ema-pruned.ckpt")
    message = str(err.value)
    assert "\n" not in message
    assert "of another shape (e.g. model.diffusion_model." in message and "in file" in message
    assert message.endswith("hint: this looks like an SD 2.x checkpoint but the config is SD 1.x")


def test_keys_expected_absent_are_not_problems(tiny_v1, tmp_path):
    state = dict(tiny_v1.state_dict())
    dropped = "model.diffusion_model.out.2.bias"
    del state[dropped]
    path = tmp_path / "partial.ckpt"
    torch.save(state, path)
    model = instantiate_from_config(load_config([TINY_V1]).model)
    with pytest.raises(CheckpointError, match="1 missing"):
        load_model(model, path)
    load_model(model, path, ignore_missing=[dropped])
