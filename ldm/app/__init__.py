"""The interactive page (scripts/app.py): session.py holds the model and renders, ui.py is the Gradio page,
cli.py the command, screenshot.py the README's picture in a headless browser."""
