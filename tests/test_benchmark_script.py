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
    found = re.search(r"ratio perfusion / before latent caching = ([\d.]+) \(that step: ([\d.]+) ms\)", out)
    assert found and float(found[1]) > 0 and float(found[2]) > 0, out
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
