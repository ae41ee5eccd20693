"""Zero-shot soft masks with CLIPSeg (Lüddecke & Ecker, CVPR 2022) through `transformers`.

- `load_clipseg(directory)`: a CLIPSeg model and processor from a local Hugging Face folder.
- `SoftMasker`: the prompt-ensemble prediction for one word, resized to each image.
- `make_preview`: a contact sheet of images beside their mask overlays.
- `tokenizer_files`: the CLIP vocabulary files rebuilt from open_clip's BPE file.
- `tiny.save_tiny_clipseg`: a randomly initialised miniature model for tests and demos.
"""
from clipseg.masks import SoftMasker, probability_to_uint8
from clipseg.model import load_clipseg
from clipseg.preview import make_preview

__all__ = ["SoftMasker", "load_clipseg", "make_preview", "probability_to_uint8"]
