r"""A local web page to dial trained Perfusion concepts: a beta and a tau slider per concept, the image
re-rendered from the same seed as a slider moves (the model and concepts are loaded once), and the
prompt's gate table (sim and gate per token and concept, leaks marked).

    python scripts/app.py --config configs/toy/perfusion.yaml \
        --concepts ckpt/toy/concepts/teal_ring.safetensors,ckpt/toy/concepts/lime_star.safetensors

Needs the `app` extra (pip install -e ".[app]"). Sliders start at a concept's stored recommendation,
else the defaults; the prompt box, steps and guidance scale at the config's validation prompt and
log-sampling settings; the image size at the model's.
"""
from __future__ import annotations

import argparse
import socket

from ldm.cli import parse_device
from ldm.errors import MissingFileError, UserError
from ldm.perfusion.edit import MULTI
from ldm.perfusion.prompts import PLACEHOLDER_TOKENS, format_prompt


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the Perfusion model YAML the concepts were trained with")
    p.add_argument("--concepts", required=True,
                   help="concept file(s), comma-separated: a.safetensors,b.safetensors ({1}, {2}, ... in the prompt)")
    p.add_argument("--ckpt", default=None,
                   help="base checkpoint or diffusers folder (default: the config's model.ckpt)")
    p.add_argument("--prompt", default=None, help="the prompt box's first text (default: from the config's "
                   "validation prompts)")
    p.add_argument("--multi", choices=MULTI, default="named", help="the rule for several concepts, as in "
                   "scripts/perfusion_txt2img.py (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present, else cpu)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    return p


def check_args(args) -> list[str]:
    """Everything that can be checked before the model is built: one line naming the flag or file."""
    from pathlib import Path

    from ldm.perfusion.concepts import load_concept

    paths = [p.strip() for p in args.concepts.split(",")]
    if any(not p for p in paths):
        raise UserError(f"--concepts {args.concepts!r} has an empty entry")
    if len(paths) > len(PLACEHOLDER_TOKENS):
        raise UserError(f"{len(paths)} concepts given; at most {len(PLACEHOLDER_TOKENS)} can be loaded at once")
    if not Path(args.config).is_file():
        raise MissingFileError(f"--config {args.config}: no such file")
    for path in paths:
        load_concept(path)   # a missing or corrupt file, named
    if args.prompt is not None:
        format_prompt(args.prompt, PLACEHOLDER_TOKENS[:len(paths)])
    args.device = str(parse_device(args.device))
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    with socket.socket() as probe:   # a taken port would otherwise fail only after the model is built
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise UserError(f"--host {args.host} --port {args.port}: cannot serve there ({err.strerror or err})")
    return paths


def main(argv=None) -> int:
    from dataclasses import replace

    from ldm.app.session import Session
    from ldm.app.ui import import_gradio, serve

    args = parser().parse_args(argv)
    paths = check_args(args)
    import_gradio()   # before the model is built: a missing extra is one line, at once
    session = Session.open(args.config, paths, args.ckpt, args.device, args.multi)
    if args.prompt is not None:
        session.defaults = replace(session.defaults, template=args.prompt)
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)")
    serve(session, args.host, args.port)
    return 0
