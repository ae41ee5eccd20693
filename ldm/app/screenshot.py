"""The app in a headless Chromium (Playwright, the system's /usr/bin/chromium; nothing is downloaded): the
README's screenshot, and what the tests drive.

    python -m ldm.app.screenshot docs/app.png

serves the toy model with the teal ring and the lime star on a free local port and saves the page.
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import tempfile
from pathlib import Path

from ldm.util import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
# headless on a closed network: without the background-networking flags Chromium stalls on its services
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOY_CONFIG = REPO_ROOT / "configs/toy/perfusion.yaml"
TOY_CONCEPTS = [REPO_ROOT / f"ckpt/toy/concepts/{name}.safetensors" for name in ("teal_ring", "lime_star")]
TOY_PROMPT = "at the top a {1} and at the bottom a {2}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 1000):
    """A Playwright page in a fresh headless Chromium profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                       headless=True, viewport={"width": width, "height": height})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def shown_image(page, timeout_ms: float = 30_000, not_src: str | None = None) -> tuple[str, bytes]:
    """The page's image (its URL and PNG bytes) once shown, and, with `not_src`, once it is another file."""
    page.wait_for_function("([old]) => { const i = document.querySelector('#image img');"
                           " return i && i.complete && i.naturalWidth > 0 && i.src !== old; }",
                           arg=[not_src], timeout=timeout_ms)
    src = page.locator("#image img").get_attribute("src")
    return src, page.request.get(src).body()


def move_slider(page, elem_id: str, value: float) -> None:
    """Set a slider's range input as a user's drag ends: Playwright fills it and fires input and change."""
    page.locator(f"#{elem_id} input[type=range]").fill(str(value))


@contextlib.contextmanager
def toy_server(prompt: str = TOY_PROMPT):
    """The app on the toy model with two toy concepts, on a free local port: yields (session, url)."""
    from dataclasses import replace

    from ldm.app.session import Session
    from ldm.app.ui import serve

    session = Session.open(TOY_CONFIG, [str(p) for p in TOY_CONCEPTS], device="cpu")
    session.defaults = replace(session.defaults, template=prompt)
    port = free_port()
    demo = serve(session, port=port, block=False)
    try:
        yield session, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def save_screenshot(url: str, out: str | Path) -> Path:
    """Load the page, wait for the image and the gate table, save a full-page PNG to `out`."""
    from ldm.util import atomic_path

    with browser_page() as page:
        page.goto(url)
        shown_image(page)
        page.wait_for_function("() => document.querySelector('#gates').innerText.includes('sks')")
        with atomic_path(out) as tmp:
            page.screenshot(path=str(tmp), full_page=True, type="png")
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="docs/app.png", help="where to save the PNG (default: %(default)s)")
    args = p.parse_args(argv)
    with toy_server() as (_, url):
        print(f"wrote {save_screenshot(url, args.out)}")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
