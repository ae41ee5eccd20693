"""scripts/app.py on the toy model with two toy concepts: a real server, a real headless Chromium moving a
slider, the HTTP API through gradio_client, and the command's one-line errors."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.app.screenshot import CHROMIUM, TOY_CONCEPTS, TOY_CONFIG, TOY_PROMPT, browser_page, move_slider, shown_image
from ldm.errors import UserError
from tests.conftest import ROOT

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# pandas 3 deprecations inside gradio's queue, not this project's
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")
SETTINGS = ("ddim", 20, 4.0, 7, 32, 32)   # sampler, steps, scale, seed, height, width


@pytest.fixture(scope="module")
def server():
    from ldm.app.screenshot import toy_server

    with toy_server() as (session, url):
        yield session, url


def pixels(data) -> np.ndarray:
    """A PNG (bytes or a file) as an array."""
    import io

    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))


def test_slider_rerenders_without_reloading(server):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium); the browser test needs it")
    session, url = server
    model, loaded, concepts = session.model, session.loaded, list(session.loaded.concepts)
    with browser_page() as page:
        page.goto(url)
        src, before = shown_image(page)
        move_slider(page, "beta-1", 0.3)
        _, after = shown_image(page, not_src=src)
    assert pixels(before).shape == pixels(after).shape == (32, 32, 3)
    assert np.abs(pixels(before).astype(int) - pixels(after)).max() > 10
    # the same model and the same loaded concepts, re-dialled in place
    assert session.model is model and session.loaded is loaded and session.loaded.concepts == concepts
    assert model.bank.state is loaded.state and loaded.betas[0] == pytest.approx(0.3)


def test_api_renders_and_gate_table(server):
    from gradio_client import Client

    from ldm.perfusion.gates import gate_tables
    from ldm.perfusion.inference import set_gates
    from ldm.perfusion.prompts import prepare_prompt

    session, url = server
    client = Client(url, verbose=False)
    low, high, again = (client.predict(TOY_PROMPT, *SETTINGS, beta, 0.15, 0.7, 0.15, api_name="/render")
                        for beta in (0.3, 1.2, 0.3))
    assert np.abs(pixels(low[0]).astype(int) - pixels(high[0])).max() > 10
    assert np.array_equal(pixels(low[0]), pixels(again[0]))
    assert low[1] == again[1] and low[1] != high[1]

    model, loaded = session.model, session.loaded
    with session.lock:
        set_gates(model, loaded, [0.3, 0.7], [0.15, 0.15])
        expected = gate_tables(model, [prepare_prompt(model.cond_stage_model.tokenizer, TOY_PROMPT, loaded)])[0]
    headers, rows = low[1]["headers"], low[1]["data"]
    assert headers == ["pos", "token", "sim {1}", "gate {1}", "sim {2}", "gate {2}", "note"]
    assert [r[0] for r in rows] == list(range(expected.tokens.index("<end>") + 1))   # no gate opens at padding
    for pos, token, s1, g1, s2, g2, note in rows:
        assert token == expected.tokens[pos]
        assert [s1, s2] == [round(v, 3) for v in expected.sim[pos]]
        assert [g1, g2] == [round(v, 3) for v in expected.gate[pos]]
    assert [r[1] for r in rows if r[-1] == "{1}"] == ["sks"] and [r[1] for r in rows if r[-1] == "{2}"] == ["ohwx"]
    assert "leak" not in str(rows) and low[2] == "no leaks"

    with pytest.raises(Exception, match=re.escape("'a {3}' names {3} but 2 concepts are loaded")):
        client.predict("a {3}", *SETTINGS, 0.7, 0.15, 0.7, 0.15, api_name="/render")


def test_defaults_come_from_the_config(server):
    from ldm.app.session import default_template
    from ldm.build import load_config

    defaults = server[0].defaults
    assert (defaults.steps, defaults.scale, defaults.side) == (20, 4.0, 32)   # configs/toy/perfusion.yaml
    sd = load_config([ROOT / "configs/perfusion_teddy.yaml"]).model.params.validation_prompts
    assert default_template(sd, 2) == "a photo of a {1} and a {2}"
    assert default_template(["a {}", "on the left a {}"], 1) == "a {}"


def test_missing_concept_is_one_line_before_serving(tmp_path):
    missing = tmp_path / "nope.safetensors"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/app.py"), "--config", str(TOY_CONFIG), "--concepts",
                           f"{TOY_CONCEPTS[0]},{missing}"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {missing}: no such concept file"]
    assert "Running on" not in done.stdout + done.stderr


def test_taken_port_and_missing_gradio(monkeypatch):
    from ldm.app.cli import check_args, parser
    from ldm.app.ui import import_gradio

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = parser().parse_args(["--config", str(TOY_CONFIG), "--concepts", str(TOY_CONCEPTS[0]),
                                    "--port", str(port), "--device", "cpu"])
        with pytest.raises(UserError, match=f"--port {port}: cannot serve there"):
            check_args(args)
    monkeypatch.setitem(sys.modules, "gradio", None)   # as if the extra were not installed
    with pytest.raises(UserError, match=r'pip install -e "\.\[app\]"'):
        import_gradio()
