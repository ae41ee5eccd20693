"""Loading a CLIPSeg model and its processor from a local Hugging Face folder, with clear errors."""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from ldm.errors import MissingFileError, UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
HINT = "download the Hugging Face model CIDAS/clipseg-rd64-refined into it (see ckpt/README.md)"


def check_model_dir(directory: str | Path) -> Path:
    """Raise FileNotFoundError/ValueError naming `directory` unless it holds a CLIPSeg model."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "no such directory"
        raise MissingFileError(f"{directory}: CLIPSeg model folder not found ({what}); {HINT}")
    config = directory / "config.json"
    if not config.is_file():
        raise MissingFileError(f"{directory}: no config.json, so not a Hugging Face model folder; {HINT}")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{config}: not a valid JSON model config ({err})") from err
    if model_type != "clipseg":
        raise UserError(f"{config}: model_type is {model_type!r}, expected 'clipseg'")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise MissingFileError(f"{directory}: no weights (looked for {', '.join(WEIGHT_FILES)}); {HINT}")
    if not any((directory / name).is_file() for name in PROCESSOR_FILES):
        raise MissingFileError(f"{directory}: no image preprocessing config "
                                f"(looked for {', '.join(PROCESSOR_FILES)}); {HINT}")
    return directory


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (
        (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    )


def load_clipseg(directory: str | Path, device: str | torch.device = "cpu"):
    """(model, processor) of the CLIPSeg model saved in `directory`, model in eval mode on `device`.

    A folder without tokenizer files gets the CLIP tokenizer rebuilt from open_clip's vocabulary
    (with a warning); nothing is downloaded.
    """
    from transformers import AutoImageProcessor, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer

    from clipseg.tokenizer_files import build_tokenizer

    directory = check_model_dir(directory)
    try:
        if _has_tokenizer(directory):
            tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
        else:
            warnings.warn(f"{directory}: no tokenizer files; using the CLIP vocabulary shipped with open_clip",
                          stacklevel=2)
            tokenizer = build_tokenizer()
        image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        processor = CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer)
        model = CLIPSegForImageSegmentation.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__).strip()
        raise UserError(f"{directory}: cannot load the CLIPSeg model: {first}") from err
    return model.to(device).eval(), processor
