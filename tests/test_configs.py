"""Configs: overlays through `base:`, one place per setting, paths inside the repository from any folder."""
from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from ldm.build import ConfigError, load_config
from tests.conftest import ROOT


@pytest.mark.parametrize("config, model", [
    ("perfusion_teddy.yaml", "stable-diffusion/v1-inference.yaml"),
    ("perfusion_custom.yaml", "stable-diffusion/v1-inference.yaml"),
    ("perfusion_teddy_sd_v2.yaml", "stable-diffusion/v2-inference.yaml"),
    ("perfusion_custom_sd_v2.yaml", "stable-diffusion/v2-inference.yaml"),
    ("tiny/perfusion-tiny.yaml", "tiny/v1-tiny.yaml"),
    ("perfusion_teddy_sdxl.yaml", "stable-diffusion/sdxl-base.yaml"),
    ("perfusion_custom_sdxl.yaml", "stable-diffusion/sdxl-base.yaml"),
    ("tiny/perfusion-sdxl-tiny.yaml", "tiny/sdxl-tiny.yaml"),
])
def test_perfusion_configs_are_overlays_on_their_model(config, model):
    merged = load_config([ROOT / "configs" / config]).model.params
    sd = load_config([ROOT / "configs" / model]).model.params
    for part in ("first_stage_config", "cond_stage_config"):      # the SD settings come from one file
        assert merged[part] == sd[part]
    unet = OmegaConf.to_container(merged.unet_config.params)
    assert {k: v for k, v in unet.items() if k != "use_checkpoint"} == \
        {k: v for k, v in OmegaConf.to_container(sd.unet_config.params).items() if k != "use_checkpoint"}
    assert "base" not in load_config([ROOT / "configs" / config])
    text = (ROOT / "configs" / config).read_text()
    assert "first_stage_config" not in text and "unet_config:\n      target" not in text


def test_base_keys_merge_first_and_refuse_loops(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {target: x.Y, params: {p: 1, q: 1}}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel: {params: {q: 2}}\n")
    assert OmegaConf.to_container(load_config([tmp_path / "b.yaml"]).model) == {"target": "x.Y", "params": {"p": 1, "q": 2}}
    (tmp_path / "c.yaml").write_text("base: d.yaml\nmodel: {}\n")
    (tmp_path / "d.yaml").write_text("base: [c.yaml]\nmodel: {}\n")
    with pytest.raises(ConfigError, match="base: keys form a loop"):
        load_config([tmp_path / "c.yaml"])
    (tmp_path / "e.yaml").write_text("base: 5\nmodel: {}\n")
    with pytest.raises(ConfigError, match="base must be a config file name"):
        load_config([tmp_path / "e.yaml"])


def test_toy_config_paths_resolve_from_any_working_directory(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        config = load_config([ROOT / "configs/toy/perfusion.yaml"])
        for path in (config.model.ckpt, config.model.params.covariance_path, config.data.params.data_root):
            assert os.path.isabs(path) and os.path.exists(path), path
    finally:
        os.chdir(cwd)


def test_a_killed_writers_temp_file_is_cleaned_by_the_next_save(tmp_path):
    from ldm.util import atomic_path

    stale = tmp_path / ".last.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    other = tmp_path / ".other.safetensors.abc123.tmp"
    other.write_bytes(b"not ours")
    with atomic_path(tmp_path / "last.safetensors") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "last.safetensors").read_bytes() == b"whole"
    assert not stale.exists() and other.exists()


@pytest.mark.slow
def test_a_toy_command_runs_from_another_folder(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ldm.toy.evaluate", "--attention", "on the left a red circle"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "localization per token" in result.stdout and not any(tmp_path.iterdir())


def test_the_tiny_training_config_runs_from_another_folder(tmp_path, monkeypatch):
    """Its images, like its captions, are found from the repository, not from the working folder."""
    from ldm.train import run

    monkeypatch.chdir(tmp_path)
    assert run(["--base", str(ROOT / "configs/tiny/perfusion-tiny.yaml"), "--logdir", str(tmp_path / "logs")]) is None
