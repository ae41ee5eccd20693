r"""A local web page with a beta and a tau slider per concept (needs pip install -e ".[app]").

    python scripts/app.py --config configs/toy/perfusion.yaml \
        --concepts ckpt/toy/concepts/teal_ring.safetensors,ckpt/toy/concepts/lime_star.safetensors

Moving a slider re-renders from the same seed without reloading anything; the page also shows the
prompt's gate table. See ldm/app/cli.py for the flags.
"""
from ldm.app.cli import main
from ldm.cli import run_cli

if __name__ == "__main__":
    run_cli(main)
