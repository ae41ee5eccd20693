"""Reading a diffusers-format Stable Diffusion folder as an original-layout state dict.

A folder with `model_index.json`, `unet/`, `vae/`, `text_encoder/` (SDXL: and `text_encoder_2/`;
and `scheduler/`) is read
part by part (safetensors, or `.bin` pickles opened with `weights_only=True`) and its parameter
names are mapped onto the CompVis names this project uses (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*`), so no conversion step and no diffusers import are
needed. The block layout (res blocks per level, which blocks have attention) is read off the names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from ldm.errors import UserError
from ldm.weights_file import read_weights_file

_WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model", ),
    "vae": ("diffusion_pytorch_model", ),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# VAE attention: current diffusers names, and those of folders saved before diffusers 0.14.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                  "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


class DiffusersFolderError(UserError):
    """A diffusers folder that cannot be read; the message is one line naming the file."""


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def read_diffusers_folder(path: str | Path) -> dict[str, torch.Tensor]:
    """The U-Net, VAE and text encoder(s) of a diffusers SD 1.x / 2.x / XL folder, under this project's
    names; SDXL's two encoders become `cond_stage_model.embedders.0` and `.1`."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for part, convert in (("unet", unet_names), ("vae", vae_names)):
        state.update(convert(_read_part(path / part, _WEIGHT_FILES[part])))
    xl = (path / "text_encoder_2").is_dir()
    listed = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if "text_encoder_2" in listed and not xl:
        raise DiffusersFolderError(f"{path}: model_index.json lists text_encoder_2 but the folder has no "
                                   "text_encoder_2/ (an SDXL pipeline needs both text encoders; copy it whole)")
    for i, part in enumerate(("text_encoder", "text_encoder_2") if xl else ("text_encoder",)):
        tensors = _read_part(path / part, _WEIGHT_FILES[part])
        prefix = f"cond_stage_model.embedders.{i}." if xl else "cond_stage_model."
        state.update(text_encoder_names(tensors, _read_json(path / part / "config.json"), prefix))
    betas = _betas(scheduler_config(path))
    if betas is not None:   # checked against the config's schedule like a checkpoint's buffer
        state["betas"] = betas
    return state


def read_vae_folder(path: str | Path) -> dict[str, torch.Tensor] | None:
    """A lone AutoencoderKL folder (e.g. a fine-tuned SD VAE) under the autoencoder's own names;
    None if `config.json` names another class."""
    path = Path(path)
    if _read_json(path / "config.json").get("_class_name") != "AutoencoderKL":
        return None
    named = vae_names(_read_part(path, _WEIGHT_FILES["vae"]))
    return {k.removeprefix("first_stage_model."): v for k, v in named.items()}


def _betas(config: Mapping | None) -> torch.Tensor | None:
    """The noise schedule a diffusers scheduler config describes, if it is one of SD's."""
    if not config or config.get("trained_betas"):
        return None
    n, start, end = config.get("num_train_timesteps", 1000), config.get("beta_start"), config.get("beta_end")
    kind = config.get("beta_schedule")
    if start is None or end is None or kind not in ("scaled_linear", "linear"):
        return None
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2


def scheduler_config(path: str | Path) -> dict | None:
    """`scheduler/scheduler_config.json` of a diffusers folder, None if it has none."""
    file = Path(path) / "scheduler" / "scheduler_config.json"
    return _read_json(file) if file.is_file() else None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise DiffusersFolderError(f"{file}: missing (a diffusers folder has one beside each part's weights)")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiffusersFolderError(f"{file}: not valid JSON ({err})")


def _read_part(folder: Path, stems: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One part's weights: `<stem>.safetensors`, its fp16 variant, a sharded index, or `<stem>.bin`."""
    for stem in stems:
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"):
            if (folder / name).is_file():
                return read_weights_file(folder / name)
        for index in (f"{stem}.safetensors.index.json", f"{stem}.bin.index.json"):
            if (folder / index).is_file():
                shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
                state: dict[str, torch.Tensor] = {}
                for shard in shards:
                    state.update(read_weights_file(folder / shard))
                return state
    raise DiffusersFolderError(f"{folder}: no weights found (expected {stems[0]}.safetensors or "
                               f"{stems[-1]}.bin, or a sharded .index.json)")


def _rename(tensors: Mapping[str, torch.Tensor], rules: list[tuple[str, str | Callable]], prefix: str,
            part: str) -> dict[str, torch.Tensor]:
    """Apply the first matching regex rule to each name; a name no rule knows is an error."""
    out = {}
    for key, value in tensors.items():
        for pattern, repl in rules:
            new, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                out[prefix + new] = value
                break
        else:
            raise DiffusersFolderError(f"{part}: parameter {key!r} has no counterpart in the original layout")
    return out


def _count(tensors: Mapping[str, torch.Tensor], pattern: str) -> set[tuple[int, ...]]:
    found = set()
    for key in tensors:
        m = re.match(pattern, key)
        if m:
            found.add(tuple(int(g) for g in m.groups()))
    return found


def unet_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel names -> `model.diffusion_model.*` (input/middle/output blocks)."""
    down_resnets = _count(tensors, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
    if not down_resnets:
        raise DiffusersFolderError("unet: no down_blocks.*.resnets.* weights; not a UNet2DConditionModel")
    per_level = 1 + max(j for _, j in down_resnets)
    up_attention = _count(tensors, r"up_blocks\.(\d+)\.attentions\.(\d+)\.")

    def down(m):   # input block 0 is conv_in; each level has per_level res blocks, then a downsampler
        i, j = int(m[1]), int(m[3])
        index = 1 + i * (per_level + 1) + (per_level if m[2] == "downsamplers" else j)
        slot = {"resnets": "0", "attentions": "1", "downsamplers": "0.op"}[m[2]]
        return f"input_blocks.{index}.{slot}{_inner(m[4], m[2])}"

    def up(m):     # each level has per_level + 1 res blocks; the upsampler follows the last one
        i, j = int(m[1]), int(m[3])
        index = i * (per_level + 1) + (per_level if m[2] == "upsamplers" else j)
        slot = {"resnets": "0", "attentions": "1",
                "upsamplers": "2" if (i, per_level) in up_attention else "1"}[m[2]]
        return f"output_blocks.{index}.{slot}{_inner(m[4], m[2])}"

    def mid(m):
        slot = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[(m[1], m[2])]
        return f"middle_block.{slot}{_inner(m[3], m[1])}"

    def _inner(rest: str, kind: str) -> str:
        if kind == "resnets":
            name, _, leaf = rest.lstrip(".").partition(".")
            return f".{_RESNET[name]}.{leaf}"
        if kind == "downsamplers":   # input_blocks.k.0.op is the convolution itself
            return rest.replace(".conv.", ".", 1)
        return rest   # attention blocks and upsamplers keep their names (norm, proj_in, ..., conv)

    rules = [
        (r"conv_in\.(weight|bias)", r"input_blocks.0.0.\1"),
        (r"time_embedding\.linear_1\.(weight|bias)", r"time_embed.0.\1"),
        (r"time_embedding\.linear_2\.(weight|bias)", r"time_embed.2.\1"),
        (r"add_embedding\.linear_1\.(weight|bias)", r"label_emb.0.0.\1"),
        (r"add_embedding\.linear_2\.(weight|bias)", r"label_emb.0.2.\1"),
        (r"conv_norm_out\.(weight|bias)", r"out.0.\1"),
        (r"conv_out\.(weight|bias)", r"out.2.\1"),
        (r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(\..*)", down),
        (r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(\..*)", up),
        (r"mid_block\.(resnets|attentions)\.(\d+)(\..*)", mid),
    ]
    return _rename(tensors, rules, "model.diffusion_model.", "unet")


def vae_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL names -> `first_stage_model.*`; the decoder's levels run in reverse order there."""
    decoder_levels = _count(tensors, r"decoder\.up_blocks\.(\d+)\.")
    if not decoder_levels:
        raise DiffusersFolderError("vae: no decoder.up_blocks.* weights; not an AutoencoderKL")
    levels = 1 + max(i for (i,) in decoder_levels)
    attention = "|".join(re.escape(k) for k in _VAE_ATTENTION)

    def resnet(m):
        where = {"down_blocks": f"down.{m[2]}", "up_blocks": f"up.{levels - 1 - int(m[2])}"}[m[1]]
        return f"{m[0].split('.')[0]}.{where}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"

    def sampler(m):
        where = f"down.{m[2]}.downsample" if m[1] == "down_blocks" else f"up.{levels - 1 - int(m[2])}.upsample"
        return f"{m[0].split('.')[0]}.{where}.conv.{m[3]}"

    rules = [
        (r"(?:encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)\.(.*)", resnet),
        (r"(?:encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(?:down|up)samplers\.0\.conv\.(weight|bias)", sampler),
        (r"(encoder|decoder)\.mid_block\.resnets\.0\.(.*)", r"\1.mid.block_1.\2"),
        (r"(encoder|decoder)\.mid_block\.resnets\.1\.(.*)", r"\1.mid.block_2.\2"),
        (rf"(encoder|decoder)\.mid_block\.attentions\.0\.({attention})\.(weight|bias)",
         lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"),
        (r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", r"\1.norm_out.\2"),
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", r"\1.\2.\3"),
        (r"(quant_conv|post_quant_conv)\.(weight|bias)", r"\1.\2"),
    ]
    out = _rename(tensors, rules, "first_stage_model.", "vae")
    for key, value in out.items():   # attention projections are linear there, 1x1 convolutions here
        if ".mid.attn_1." in key and key.endswith(".weight") and value.dim() == 2:
            out[key] = value[:, :, None, None]
    return out


def text_encoder_names(tensors: Mapping[str, torch.Tensor], config: Mapping,
                       prefix: str = "cond_stage_model.") -> dict[str, torch.Tensor]:
    """CLIPTextModel names -> `<prefix>*`.

    A CLIP encoder (quick_gelu: SD 1.x, SDXL's first) is the same transformers model here. An OpenCLIP
    encoder (gelu) is the OpenCLIP text tower saved as a CLIPTextModel (SD 2.x: without its last
    block, which it skips) or, SDXL's second, a CLIPTextModelWithProjection: its names map onto
    open_clip's, q/k/v stacked into one input projection, the projection transposed.
    """
    tensors = {k.removeprefix("text_model."): v for k, v in tensors.items() if not k.endswith("position_ids")}
    if config.get("hidden_act", "quick_gelu") == "quick_gelu":
        return {f"{prefix}transformer.{k}": v for k, v in tensors.items()}
    out = {}
    projection = tensors.pop("text_projection.weight", None)
    if projection is not None:   # open_clip stores x @ P, transformers a Linear (P^T)
        out[f"{prefix}model.text_projection"] = projection.T.contiguous()
    layer = r"encoder\.layers\.(\d+)\."
    rules = [
        (r"embeddings\.token_embedding\.weight", "token_embedding.weight"),
        (r"embeddings\.position_embedding\.weight", "positional_embedding"),
        (r"final_layer_norm\.(weight|bias)", r"ln_final.\1"),
        (layer + r"self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
        (layer + r"layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
        (layer + r"layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
        (layer + r"mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
        (layer + r"mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    ]
    qkv = {k: v for k, v in tensors.items() if re.search(r"self_attn\.[qkv]_proj\.", k)}
    out.update(_rename({k: v for k, v in tensors.items() if k not in qkv}, rules, f"{prefix}model.",
                       "text_encoder"))
    for block, in sorted(_count(qkv, layer + r"self_attn\.q_proj\.")):
        for leaf in ("weight", "bias"):
            parts = [qkv[f"encoder.layers.{block}.self_attn.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"{prefix}model.transformer.resblocks.{block}.attn.in_proj_{leaf}"] = torch.cat(parts)
    return out
