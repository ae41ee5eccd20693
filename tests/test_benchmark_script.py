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


def test_bad_counts_are_one_line_errors(capsys):
    script = _script()
    for argv, message in ((["ema", "--repeats", "1"], "--repeats: expected a whole number >= 2, got '1'"),
                          (["train-step", "--repeats", "0"], "--repeats: expected a whole number >= 1, got '0'"),
                          (["train-step", "--batch_size", "0"], "--batch_size: expected a whole number >= 1, got '0'"),
                          (["sample", "--threads", "-1"], "--threads: expected a whole number >= 0, got '-1'")):
        with pytest.raises(SystemExit):
            script.main([*argv, "--config", str(ROOT / "configs/tiny/v1-tiny.yaml")])
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
