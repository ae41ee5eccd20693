"""Packaging: environment.yaml's pip section mirrors pyproject.toml; the README's commands exist."""
from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import ROOT


def test_environment_yaml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) - {"-e ."} == wanted


def test_readme_commands_name_existing_files():
    readme = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/])(?:configs|scripts|data)/[\w./-]+\.(?:yaml|py)", readme))
    assert paths, "the README names no config or script"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert missing == []
    for command in ("pip install -e \".[test]\"", "python -m pytest -q", "python main.py --base configs/tiny/perfusion-tiny.yaml -t"):
        assert command in readme
    ci = (ROOT / ".ci/run").read_text()
    assert "pip install --quiet -e \".[test]\"" in ci and "python -m pytest -q" in ci
