"""The page (Gradio): prompt, a beta and a tau slider per concept, sampling settings, the image and the
prompt's gate table. Moving a slider re-renders from the same seed with the concepts already loaded."""
from __future__ import annotations

import os
from pathlib import Path

from ldm.errors import UserError

# small images (the toy model's 32 px) fill the frame, sharp
CSS = "#image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }"


def import_gradio():
    """gradio, installed with the `app` extra; never phoning home (analytics, version checks)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise UserError('the app needs Gradio: pip install -e ".[app]"') from None
    return gradio


def build_ui(session):
    """The gr.Blocks of `session`; its render event is the HTTP API's /render: (prompt, sampler, steps,
    scale, seed, height, width, beta 1, tau 1, beta 2, tau 2, ...) -> (image, gate table, note)."""
    from ldm.app.session import gate_rows
    from ldm.perfusion.gates import leak_warning
    from ldm.sample import SAMPLERS

    gr = import_gradio()
    loaded, d = session.loaded, session.defaults
    n = len(loaded.concepts)
    # every render is a PNG in Gradio's cache: drop those older than an hour, hourly
    with gr.Blocks(title="Perfusion", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown("### Perfusion\n" + "\n".join(
            f"- `{{{k + 1}}}`{' (or `{}`)' if n == 1 else ''}: {Path(name).name}, superclass *{c.superclass}*"
            f" (beta from {src['beta']}, tau from {src['tau']})"
            for k, (name, c, src) in enumerate(zip(loaded.names, loaded.concepts, session.sources))))
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(d.template, label="prompt", info="{1}, {2}, ... name the concepts; Enter renders")
                gates = []
                for k, (beta, tau) in enumerate(zip(loaded.betas, loaded.taus)):
                    with gr.Row():
                        gates += [gr.Slider(min(0.0, beta), max(1.5, beta), beta, step=0.01, label=f"beta {{{k + 1}}}",
                                            info="lower shows more", elem_id=f"beta-{k + 1}"),
                                  gr.Slider(min(0.01, tau), max(1.0, tau), tau, step=0.01, label=f"tau {{{k + 1}}}",
                                            elem_id=f"tau-{k + 1}")]
                with gr.Row():
                    sampler = gr.Dropdown(sorted(SAMPLERS), value=d.sampler, label="sampler")
                    steps = gr.Number(d.steps, label="steps", precision=0, minimum=1)
                    scale = gr.Number(d.scale, label="guidance scale")
                with gr.Row():
                    seed = gr.Number(d.seed, label="seed", precision=0, minimum=0)
                    height = gr.Number(d.side, label="height", precision=0, minimum=8)
                    width = gr.Number(d.side, label="width", precision=0, minimum=8)
                button = gr.Button("Render", variant="primary")
            with gr.Column():
                image = gr.Image(label="image", format="png", height=320, interactive=False, elem_id="image")
                note = gr.Markdown(elem_id="note")
        table = gr.Dataframe(label="gates: sim and gate per token and concept (leak: another token's gate above 0.5)",
                             elem_id="gates", interactive=False, max_height=900)

        def render(text, sampler, steps, scale, seed, height, width, *values):
            if None in (steps, scale, seed, *values):   # an emptied number box
                raise gr.Error("steps, guidance scale, seed, beta and tau each need a number")
            try:
                pixels, found = session.render(text, values[0::2], values[1::2], sampler, steps, scale, seed,
                                               height, width)
            except UserError as err:
                raise gr.Error(str(err)) from None
            if found is None:
                return pixels, None, "textual-inversion concepts: no gates"
            headers, rows = gate_rows(found)
            return pixels, {"headers": headers, "data": rows}, leak_warning(found, values[0::2]) or "no leaks"

        # one model: renders run one at a time, the last slider position winning over those dragged past
        gr.on([demo.load, button.click, prompt.submit, *(g.change for g in gates)], render,
              [prompt, sampler, steps, scale, seed, height, width, *gates], [image, table, note],
              api_name="render", trigger_mode="always_last", concurrency_limit=1, concurrency_id="render")
    return demo


def serve(session, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Start the page's server; with `block=False` return the running gr.Blocks (close() stops it)."""
    demo = build_ui(session)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, css=CSS, ssr_mode=False,
                quiet=not block, footer_links=["api"])
    return demo
