"""Pretrain the toy world's base model with this project's own main.py, in one command.

    python -m ldm.toy.pretrain --out ckpt/toy

1. the KL autoencoder (configs/toy/autoencoder.yaml) -> <logdir>/toy-autoencoder.safetensors
2. the CLIP-architecture text encoder pretrained on captions alone (configs/toy/text_encoder.yaml)
   -> <logdir>/toy-text-encoder.safetensors
3. the text-to-image LatentDiffusion trained from scratch with that text encoder frozen and the
   attention of each object's words localized on the object (configs/toy/ldm.yaml)
   -> <logdir>/toy-ldm-trained.safetensors
4. the autoencoder's decoder fine-tuned with its encoder frozen, so the latent space stays as it
   is (configs/toy/decoder.yaml) -> <logdir>/toy-decoder.safetensors
5. stage 3's model with stage 4's decoder -> <out>/toy-ldm.safetensors (CompVis names, float16),
   and the text encoder's covariance over 20k fresh toy captions (data/estimate_covariance.py)
   -> <out>/covariance.safetensors

Extra `key=value` arguments are passed to every training run (e.g. lightning.trainer.max_steps=10
for a smoke test). Runs go to --logdir as usual (TensorBoard shows them). `--resume` continues an
interrupted pretraining in the same --logdir: a finished stage is skipped, an unfinished one goes on
from its run's checkpoints/last.ckpt (saved every 1000 steps).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldm.util import REPO_ROOT as ROOT
from ldm.util import atomic_path


def save_weights(module: torch.nn.Module | dict, path: Path, dtype=torch.float16) -> Path:
    """A module's state dict (or a state dict) as safetensors; floating tensors stored as `dtype`
    (loading casts back)."""
    state = module.state_dict() if isinstance(module, torch.nn.Module) else module
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "toy-ldm"})
    return path


@torch.no_grad()
def normalize_latent_scale(vae, images: torch.Tensor) -> float:
    """Rescale the autoencoder's latent space to unit standard deviation, exactly.

    SD keeps a `scale_factor` (0.18215) beside its autoencoder; here the factor is folded into the
    weights instead: the posterior mean is multiplied by s = 1/std (quant_conv's mean rows, and
    log-variance + 2 log s), and post_quant_conv divides by s, so decode(encode(x)) is unchanged
    and the diffusion model sees latents of unit scale with scale_factor 1."""
    vae.eval()
    s = 1.0 / float(vae.encode(images).mode().std())
    e = vae.embed_dim
    vae.quant_conv.weight[:e] *= s
    vae.quant_conv.bias[:e] *= s
    vae.quant_conv.bias[e:] += 2 * torch.log(torch.tensor(s))
    vae.post_quant_conv.weight /= s
    return s


def _train(configs: list[Path], name: str, logdir: str, overrides: list[str], resume: bool):
    from ldm import train

    runs = sorted(p for p in Path(logdir).glob(f"*_{name}") if (p / "checkpoints/last.ckpt").is_file())
    if resume and runs:
        print(f"resuming {name} from {runs[-1]}")
        trainer = train.run(["--resume", str(runs[-1]), "-t", *overrides])
    else:
        trainer = train.run(["--base", *map(str, configs), "-t", "--name", name, "--logdir", logdir, *overrides])
    return trainer.lightning_module


def _stage(path: Path, resume: bool, train) -> Path:
    """Run `train() -> module` and save its weights to `path`, unless resuming and `path` exists."""
    if not (resume and path.is_file()):
        save_weights(train(), path, dtype=torch.float32)
    return path


def pretrain(out: Path, logdir: str, overrides: list[str], captions: int, resume: bool = False) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    logs, configs = Path(logdir), ROOT / "configs/toy"
    times = {}

    def autoencoder():
        vae = _train([configs / "autoencoder.yaml"], "toy-autoencoder", logdir, overrides, resume)
        from ldm.toy.dataset import ToyCaptionDataset

        sample = ToyCaptionDataset(512, seed=4)
        scale = normalize_latent_scale(vae, torch.stack([sample[i]["image"] for i in range(512)]))
        print(f"latent scale folded into the autoencoder: x{scale:.4f}")
        return vae

    t0 = time.perf_counter()
    vae_path = _stage(logs / "toy-autoencoder.safetensors", resume, autoencoder)
    times["autoencoder"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text = _stage(logs / "toy-text-encoder.safetensors", resume, lambda: _train(
        [configs / "text_encoder.yaml"], "toy-text-encoder", logdir, overrides, resume))
    times["text encoder"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    trained = _stage(logs / "toy-ldm-trained.safetensors", resume, lambda: _train(
        [configs / "ldm.yaml"], "toy-ldm", logdir,
        [f"model.params.first_stage_ckpt={vae_path}", f"model.params.cond_stage_ckpt={text}", *overrides], resume))
    times["ldm"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    decoder = _stage(logs / "toy-decoder.safetensors", resume, lambda: _train(
        [configs / "decoder.yaml"], "toy-decoder", logdir, [f"model.ckpt={vae_path}", *overrides], resume))
    times["decoder"] = time.perf_counter() - t0

    ldm_path = out / "toy-ldm.safetensors"
    state = load_file(str(trained))
    state.update({f"first_stage_model.{k}": v for k, v in load_file(str(decoder)).items()})
    save_weights(state, ldm_path)

    t0 = time.perf_counter()
    from ldm.perfusion.estimate_covariance import main as estimate
    from ldm.toy.dataset import ToyCaptionDataset

    # The toy text encoder only knows the toy grammar, so C comes from toy captions (unseen seed).
    caption_file = Path(logdir) / "toy-captions.txt"
    world = ToyCaptionDataset(captions, seed=3)
    caption_file.write_text("".join(world[i]["caption"] + "\n" for i in range(captions)))
    code = estimate(["--config", str(ROOT / "configs/toy/ldm.yaml"), "--ckpt", str(ldm_path),
                     "--captions", str(caption_file), "--out", str(out / "covariance.safetensors")])
    if code:
        raise SystemExit(code)
    times["covariance"] = time.perf_counter() - t0
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "ckpt/toy"), help="where the weights go")
    p.add_argument("--logdir", default=str(ROOT / "logs"), help="where the training runs go")
    p.add_argument("--covariance_captions", type=int, default=20000)
    p.add_argument("--resume", action="store_true", help="continue an interrupted pretraining in --logdir")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every training run")
    args = p.parse_args(argv)
    times = pretrain(Path(args.out), args.logdir, args.overrides, args.covariance_captions, args.resume)
    total = sum(times.values())
    print("pretraining time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) + f", total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
