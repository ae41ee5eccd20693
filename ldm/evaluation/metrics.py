"""The paper's image metrics, from local weights only: CLIP-T, CLIP-I (Sec. 5) and DINO (DreamBooth).

    clip = ClipMetric("ViT-L-14", "ckpt/metrics/open_clip_vit_l14.safetensors")   # open_clip
    dino = DinoMetric("ckpt/metrics/dino-vits16")                                  # transformers folder
    clip.text_similarity(images, prompts)    # CLIP-T: cosine of each image with its prompt
    clip.image_similarity(images, refs)      # CLIP-I: mean cosine of each image with every reference
    dino.image_similarity(images, refs)      # DINO: the same on the ViT's CLS token

Images are float tensors (B, 3, H, W) in [0, 1]; each is resized (shorter side, bicubic) and
centre-cropped to the model's input size and normalised with the model's mean and std, so a
score does not depend on the batch it was computed in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ldm.errors import MissingFileError, UserError

CLIP_HINT = ("download an open_clip checkpoint file to that path, e.g. open_clip_pytorch_model.bin of "
             "laion/CLIP-ViT-L-14-laion2B-s32B-b82K on the Hugging Face hub (--clip_model ViT-L-14; see ckpt/README.md)")
DINO_HINT = ("download the folder facebook/dino-vits16 from the Hugging Face hub to that path (config.json, "
             "the weights, preprocessor_config.json; see ckpt/README.md)")


def preprocess(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the model's input: shorter side to `size`, centre crop, normalise."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    resized = F.interpolate(images.float(), size=(max(size, round(h * scale)), max(size, round(w * scale))),
                            mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    crop = resized[..., top:top + size, left:left + size]
    return (crop - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def mean_pairwise_cosine(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per image: its mean cosine similarity with every reference (features are normalised here)."""
    return (F.normalize(features, dim=-1) @ F.normalize(references, dim=-1).T).mean(-1)


class _Metric:
    batch = 32   # images per forward pass; the scores do not depend on it
    size: int
    mean: Sequence[float]
    std: Sequence[float]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a preprocessed batch."""
        raise NotImplementedError

    @torch.no_grad()
    def image_features(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images: a (B, 3, H, W) batch or a list of (3, H, W) of any sizes, in [0, 1]."""
        x = torch.cat([preprocess(im[None], self.size, self.mean, self.std) for im in images])
        return torch.cat([self._features(x[i:i + self.batch].to(self.device)).float().cpu()
                          for i in range(0, len(x), self.batch)])

    def image_similarity(self, images, references) -> torch.Tensor:
        """Per generated image, the mean cosine with the reference (training) images."""
        return mean_pairwise_cosine(self.image_features(images), self.image_features(references))

    def similarity_to(self, images, reference_features: torch.Tensor) -> torch.Tensor:
        """`image_similarity` against references whose features were computed once (`image_features`)."""
        return mean_pairwise_cosine(self.image_features(images), reference_features)


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle

    from safetensors import SafetensorError

    return (RuntimeError, AssertionError, ValueError, KeyError, OSError, pickle.UnpicklingError, SafetensorError)


LOAD_ERRORS = _load_errors()   # what reading a metric model's files raises when a file is not what it should be


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'unreadable'}"


class ClipMetric(_Metric):
    """An open_clip model: `model_name` is an architecture name (ViT-L-14) or a JSON model config
    file (open_clip's format), `checkpoint` its weights (safetensors, or .bin/.pt read with weights_only)."""

    def __init__(self, model_name: str, checkpoint: str | Path, device: str = "cpu"):
        import open_clip

        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise MissingFileError(f"--clip_ckpt {checkpoint}: no such file; {CLIP_HINT}")
        if model_name.endswith(".json"):
            if not Path(model_name).is_file():
                raise MissingFileError(f"--clip_model {model_name}: no such model config file")
            try:   # read here first: open_clip keeps every config path it is given, and rereads them all
                json.loads(Path(model_name).read_text())
            except (ValueError, UnicodeDecodeError) as err:   # json's errors are ValueErrors
                raise UserError(f"--clip_model {model_name}: not a valid open_clip model config ({err})") from None
            open_clip.add_model_config(model_name)
            model_name = Path(model_name).stem
        if model_name not in open_clip.list_models():
            raise UserError(f"--clip_model {model_name!r} is not an open_clip architecture (e.g. ViT-L-14, "
                            "ViT-B-32) or a model config .json file")
        try:
            self.model = open_clip.create_model(model_name, pretrained=str(checkpoint), device=device).eval()
        except LOAD_ERRORS as err:   # a truncated, tampered or other model's file
            raise UserError(f"--clip_ckpt {checkpoint}: cannot be loaded as {model_name} ({_first_line(err)})") from None
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.size = size if isinstance(size, int) else size[0]
        self.mean, self.std = cfg["mean"], cfg["std"]
        self.device = device

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float().cpu()

    def text_similarity(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-T: per image, the cosine between it and its prompt."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        image, text = F.normalize(self.image_features(images), dim=-1), F.normalize(self.text_features(prompts), dim=-1)
        return (image * text).sum(-1)


class DinoMetric(_Metric):
    """A self-supervised ViT in transformers format (a folder: config.json and weights); its CLS
    token of the last layer is the image's feature, as DreamBooth's DINO score uses."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        from transformers import ViTModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # a command's output stays its own lines
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise MissingFileError(f"--dino {folder}: no config.json there; {DINO_HINT}")
        try:
            kind = json.loads((folder / "config.json").read_text()).get("model_type")
            if kind != "vit":
                raise UserError(f"--dino {folder}: a {kind!r} model, expected a ViT ({DINO_HINT})")
            self.model, info = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False,
                                                        output_loading_info=True)
            processor = folder / "preprocessor_config.json"
            cfg = json.loads(processor.read_text()) if processor.is_file() else {}
        except UserError:
            raise
        except LOAD_ERRORS as err:
            raise UserError(f"--dino {folder}: cannot be loaded ({_first_line(err)})") from None
        if info["missing_keys"]:
            raise UserError(f"--dino {folder}: its weights lack {len(info['missing_keys'])} of the ViT's tensors "
                            f"(e.g. {info['missing_keys'][0]}); {DINO_HINT}")
        self.model = self.model.to(device).eval()
        size = cfg.get("size", self.model.config.image_size)
        self.size = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else int(size)
        self.mean = cfg.get("image_mean", (0.485, 0.456, 0.406))   # ImageNet's, DINO's training statistics
        self.std = cfg.get("image_std", (0.229, 0.224, 0.225))
        self.device = device

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]
