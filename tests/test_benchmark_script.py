"""scripts/benchmark.py, the measurements the README quotes: run for real on the tiny configs."""
from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ema_benchmark_times_both_updates_and_they_agree(capsys):
    assert _script().main(["ema", "--config", str(ROOT / "configs/tiny/v1-tiny.yaml"), "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"per-tensor EMA update ([\d.]+) ms, foreach ([\d.]+) ms, ratio ([\d.]+)x; "
                      r"largest difference ([\d.e+-]+)", out)
    assert found, out
    per_tensor, foreach, ratio, diff = map(float, found.groups())
    assert per_tensor > 0 and foreach > 0 and ratio > 0
    assert diff < 1e-5   # the same average, up to float rounding


def test_training_benchmarks_time_the_cached_step_and_report_memory(capsys):
    tiny = str(ROOT / "configs/tiny/perfusion-tiny.yaml")
    cheap = "model.params.covariance_max_captions=100"
    assert _script().main(["train-step", "--config", tiny, "--repeats", "1", "--batch_size", "1", cheap]) == 0
    out = capsys.readouterr().out
    ratios = dict(re.findall(r"ratio perfusion / (.+?) += ([\d.]+)", out))
    assert set(ratios) == {"edit switched off", "frozen base model step", "plain LatentDiffusion",
                           "before latent caching"}, out
    assert all(float(r) > 0 for r in ratios.values())
    assert _script().main(["train-memory", "--config", tiny, "--steps", "1", cheap]) == 0
    out = capsys.readouterr().out
    assert re.search(r"32 px, batch 1, 1 steps, gradient checkpointing off\n"
                     r"peak memory after building: \d+ MiB .*; after the training steps: \d+ MiB", out), out


def test_bad_counts_are_one_line_errors(capsys):
    script = _script()
    for argv, message in ((["ema", "--repeats", "1"], "--repeats: expected a whole number >= 2, got '1'"),
                          (["train-step", "--repeats", "0"], "--repeats: expected a whole number >= 1, got '0'"),
                          (["train-step", "--batch_size", "0"], "--batch_size: expected a whole number >= 1, got '0'"),
                          (["sample", "--threads", "-1"], "--threads: expected a whole number >= 0, got '-1'")):
        with pytest.raises(SystemExit):
            script.main([*argv, "--config", str(ROOT / "configs/tiny/v1-tiny.yaml")])
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_gpu_report_runs_its_table_on_the_cpu_stand_ins_and_refuses_sd_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert _script().main(["gpu-report", "--models", "tiny", "--precisions", "bf16", "--device", "cpu",
                           "--repeats", "1", "--sample_steps", "2", "--out", str(out)]) == 0
    table = out.read_text()
    assert "| tiny SD 1.x | 32 px | bf16 |" in table and "sampling, 2 DDIM steps" in table, table
    row = next(line for line in table.splitlines() if line.startswith("| tiny"))
    step, *_ = re.findall(r"(\d+) ms", row)
    assert int(step) > 0 and re.search(r"[\d.]+ s \([\d.]+x\)", row), row
    from ldm.errors import UserError

    if not __import__("torch").cuda.is_available():
        with pytest.raises(UserError, match="on a CUDA GPU; this machine has cpu"):
            _script().main(["gpu-report", "--out", str(tmp_path / "x.md")])
    with pytest.raises(UserError, match="--models: unknown 'sd3'"):
        _script().main(["gpu-report", "--models", "sd3", "--device", "cpu"])
