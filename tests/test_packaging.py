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
    for command in ("make demo", "make test", "pip install -e \".[test]\"", "python -m pytest -q"):
        assert command in readme
    assert "make test" in (ROOT / ".ci/run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "-m pytest -q" in makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "pip install --quiet -e \".[test]\"" in makefile
    assert len(readme.splitlines()) <= 250


def test_readme_python_example_runs(monkeypatch):
    """The README's first Python block, executed as written (on the toy model it builds), from the repository.
    The second (a diffusers pipeline) needs SD weights; tests/test_diffusers.py runs its calls on a tiny one."""
    readme = (ROOT / "README.md").read_text()
    code, pipeline = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert "apply_concepts(pipe" in pipeline and "remove_concepts(pipe)" in pipeline
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert tuple(namespace["images"].shape) == (2, 3, 32, 32)
    assert not namespace["model"].bank.active
