"""main.py end to end with the real tiny PerfusionLatentDiffusion (configs/tiny/perfusion-tiny.yaml):
runs of a few optimizer steps on two 32x32 photos with masks, in-process, plus one 2-process DDP run."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data as skdata
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from ldm import train as main
from ldm.build import ConfigError, build_model, load_config
from ldm.callbacks import StepProgressBar
from ldm.checkpoint import CheckpointError
from ldm.cli import run_cli
from ldm.data.loader import ShuffledPassSampler, derive_seed
from ldm.perfusion.concepts import load_concept
from ldm.util import instantiate_from_config

pytestmark = pytest.mark.slow   # Lightning training runs

ROOT = Path(__file__).resolve().parents[1]
PERFUSION = ROOT / "configs/tiny/perfusion-tiny.yaml"
CONCEPT_KEYS = ("embedding", "i_star", "i_super", "initialized")  # + o_star_v.<l>: the learned state


@pytest.fixture(scope="module")
def one_thread():
    """Two OpenMP threads on a busy 2-core machine slow the tiny model down a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_concept(root: Path) -> Path:
    """Two photos (JPEG and PNG) and their masks in `<root>/mask/`, as data/soft_segment.py writes them."""
    root.mkdir(parents=True)
    (root / "mask").mkdir()
    for name, picture in (("cat.jpg", skdata.chelsea()), ("cup.png", skdata.coffee())):
        Image.fromarray(picture).save(root / name)
        mask = np.zeros(picture.shape[:2], np.uint8)
        mask[:, picture.shape[1] // 4: 3 * picture.shape[1] // 4] = 255
        Image.fromarray(mask, mode="L").save(root / "mask" / f"{Path(name).stem}.png")
    return root


def write_config(path: Path, data_root: Path) -> Path:
    """Merged over perfusion-tiny.yaml: the test photos with masks, batch 2 x accumulate 2, 4 steps,
    everything written every 2 steps; C from 300 captions and 2 sampling steps for the logged images."""
    config = {
        "model": {"params": {"covariance_captions": str(ROOT / "data/captions.txt"), "covariance_max_captions": 300,
                             "log_sample_steps": 2}},
        "data": {"params": {"data_root": str(data_root), "size": 32, "use_masks": True},
                 "batch_size": 2, "num_workers": 0},
        "lightning": {"trainer": {"max_steps": 4, "accumulate_grad_batches": 2, "log_every_n_steps": 1},
                      "callbacks": {"concept_checkpoint": {"every_n_steps": 2}, "checkpoint": {"every_n_steps": 2},
                                    "image_logger": {"every_n_steps": 2, "max_images": 2}}},
    }
    OmegaConf.save(OmegaConf.create(config), path)
    return path


class Terminal(io.StringIO):
    """Captured output that says it is a terminal, as an interactive stdout does."""

    def isatty(self) -> bool:
        return True


def run_main(argv: list[str], extra_callbacks=(), terminal: bool = False):
    out = Terminal() if terminal else io.StringIO()
    with redirect_stdout(out):
        trainer = main.run(argv, extra_callbacks=extra_callbacks)
    return trainer, out.getvalue()


def tensorboard(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def learned_state(model) -> dict[str, torch.Tensor]:
    """The concept's tensors as the model holds them (parameters and buffers)."""
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in model.non_base_keys()}


class RecordLogImagesMode(pl.Callback):
    """Wraps the model's `log_images` to record whether it ran in training mode and with gradients."""

    def __init__(self):
        self.calls: list[tuple[bool, bool]] = []

    def on_fit_start(self, trainer, pl_module):
        log_images = pl_module.log_images

        def recorded(*args, **kwargs):
            self.calls.append((pl_module.training, torch.is_grad_enabled()))
            return log_images(*args, **kwargs)

        pl_module.log_images = recorded


class CtrlC(pl.Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) before the first batch of optimizer step `at_step + 1`,
    keeping the concept as it is at that moment."""

    def __init__(self, at_step: int):
        self.at_step, self.concept = at_step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            self.concept = {k: v.clone() for k, v in pl_module.concept().tensors().items()}
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("train")
    config = write_config(base / "cat.yaml", write_concept(base / "concept"))
    spy = RecordLogImagesMode()
    trainer, stdout = run_main(["--base", str(PERFUSION), str(config), "-t", "--name", "cat",
                                "--logdir", str(base / "logs"), "--accelerator", "cpu", "model.params.tau=0.2"],
                               extra_callbacks=[spy])
    (run_dir,) = (base / "logs").iterdir()
    return SimpleNamespace(trainer=trainer, stdout=stdout, run_dir=run_dir, base=base, config=config, spy=spy)


def test_run_directory_layout(first_run):
    run_dir = first_run.run_dir
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_cat", run_dir.name)
    assert sorted(p.name for p in (run_dir / "concepts").iterdir()) == \
        ["last.safetensors", "step_000002.safetensors", "step_000004.safetensors"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == sorted(
        f"{name}_step_00000{s}.png" for name in ("inputs", "inputs_masked", "samples", "concept_attention")
        for s in (2, 4))
    (saved,) = (run_dir / "configs").iterdir()
    config = OmegaConf.load(saved)
    assert config.model.target == "ldm.perfusion.model.PerfusionLatentDiffusion"
    assert config.model.params.tau == 0.2 and config.model.params.unet_config.params.model_channels == 32
    assert config.data.params.use_masks is True and config.data.params.superclass == "cat"  # merged
    assert config.lightning.trainer.accelerator == "cpu" and config.lightning.seed == 23


def test_overrides_and_learning_rates_reach_the_model(first_run):
    model, trainer = first_run.trainer.lightning_module, first_run.trainer
    assert type(model).__name__ == "PerfusionLatentDiffusion" and model.tau == 0.2
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == {"o_star_v": 0.03, "embedding": 0.006}
    assert len(groups["embedding"]["params"]) == 1 and groups["embedding"]["params"][0] is model.embedding
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)  # nothing else trains


def test_progress_is_counted_in_optimizer_steps(first_run):
    trainer = first_run.trainer
    assert trainer.global_step == 4
    assert trainer.num_training_batches == 8  # 4 steps x accumulate 2: one loader pass is the whole run
    assert trainer.current_epoch <= 1
    (bar,) = [cb for cb in trainer.callbacks if isinstance(cb, StepProgressBar)]
    assert bar.train_progress_bar.n == 4 and bar.train_progress_bar.total == 4
    assert "4/4 steps" in first_run.stdout and "Epoch" not in first_run.stdout
    assert "effective batch 4 = 2 x 2 x 1 device(s)" in first_run.stdout


def test_progress_bar_is_quiet_when_stdout_is_not_a_terminal(first_run):
    # The whole run takes a few seconds, less than StepProgressBar.log_interval_s: drawn at start and end only.
    assert re.findall(r"(\d)/4 steps", first_run.stdout) == ["0", "4"]


def test_tensorboard_has_loss_learning_rates_and_images(first_run):
    events = tensorboard(first_run.run_dir)
    assert {"train/loss", "lr-AdamW/o_star_v", "lr-AdamW/embedding"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("train/loss")
    assert len(losses) >= 4 and all(np.isfinite(e.value) and e.value > 0 for e in losses)
    assert max(e.step for e in losses) <= 4
    for group, lr in (("o_star_v", 0.03), ("embedding", 0.006)):  # the configured rates, every step
        rates = events.Scalars(f"lr-AdamW/{group}")
        assert {e.step for e in rates} == {0, 1, 2, 3} and all(e.value == pytest.approx(lr) for e in rates)
    for name, count in (("inputs", 2), ("inputs_masked", 2), ("samples", 2), ("concept_attention", 1)):
        images = events.Images(f"train/{name}")
        assert [e.step for e in images] == [2, 4]
        # one row, padding 2 (make_grid leaves a single image as it is)
        assert (images[0].width, images[0].height) == ((count * 34 + 2, 36) if count > 1 else (32, 32))
    # the samples change as the concept learns
    assert events.Images("train/samples")[0].encoded_image_string != events.Images("train/samples")[1].encoded_image_string


def test_image_logger_runs_in_eval_mode_and_restores_train_mode(first_run):
    assert first_run.spy.calls == [(False, False), (False, False)]  # steps 2 and 4: eval mode, no gradients
    model = first_run.trainer.lightning_module
    assert model.training and model.model.training and not model.first_stage_model.training


def test_concept_files_are_perfusion_concepts(first_run):
    run_dir, model = first_run.run_dir, first_run.trainer.lightning_module
    paths = sorted((run_dir / "concepts").iterdir())
    for path in paths:
        concept = load_concept(path)
        assert (concept.placeholder, concept.superclass) == ("*", "cat")  # from perfusion-tiny.yaml
        assert (concept.train_beta, concept.train_tau) == (0.75, 0.2)
        # 7 cross-attention layers in the tiny U-Net: 2 down, 1 middle, 4 up
        assert len(concept.o_star_v) == len(model.o_star_v) == 7 and concept.embedding.shape == (64,)
        assert concept.fingerprints == model.fingerprints() and concept.fingerprints["covariance"]
        floats = sum(v.numel() for v in concept.tensors().values())
        assert floats == 544 and 4 * floats < path.stat().st_size < 4096  # about 3 KB: float32 + header
    last = load_concept(run_dir / "concepts" / "last.safetensors").tensors()
    assert last.keys() == model.concept().tensors().keys()
    assert all(torch.equal(v, model.concept().tensors()[k]) for k, v in last.items())
    step2 = load_concept(run_dir / "concepts" / "step_000002.safetensors").tensors()
    assert not torch.equal(step2["embedding"], last["embedding"])  # steps 3-4 changed the concept
    assert not torch.equal(step2["o_star_v.0"], last["o_star_v.0"])


def test_superclass_target_is_the_moving_average_of_the_batches(first_run):
    config = load_config([PERFUSION, first_run.config])
    i_super = first_run.trainer.lightning_module.i_super
    assert (i_super - replay_i_super(config, seed=23, ranks=[0])).abs().max() < 1e-5


def test_resume_checkpoint_holds_only_the_learned_state(first_run):
    run_dir, model = first_run.run_dir, first_run.trainer.lightning_module
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"]
    state = learned_state(model)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in state.items())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(ckpt["state_dict"])  # frozen U-Net, VAE, text encoder left out
    assert ckpt["frozen_parameters"]["omitted"] == len(frozen) > 0
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size < 100_000


def copy_run(first_run, tmp_path) -> Path:
    """A copy of the first run's directory, so that resuming it leaves the shared run untouched."""
    return Path(shutil.copytree(first_run.run_dir, tmp_path / first_run.run_dir.name))


def test_resume_restores_the_concept_and_continues_the_step_count(first_run, tmp_path):
    run_dir = copy_run(first_run, tmp_path)
    trained = learned_state(first_run.trainer.lightning_module)
    assert set(CONCEPT_KEYS) < trained.keys() and bool(trained["initialized"])
    # Nothing left to do at max_steps=4: the restored concept is exactly the trained one.
    trainer, _ = run_main(["--resume", str(run_dir / "checkpoints" / "last.ckpt"), "-t"])
    assert trainer.global_step == 4
    restored = learned_state(trainer.lightning_module)
    assert restored.keys() == trained.keys() and all(torch.equal(restored[k], v) for k, v in trained.items())
    # Two more steps, with the first run's override (tau) kept from its saved config; on a terminal
    # the bar is drawn at every step.
    trainer, stdout = run_main(["--resume", str(run_dir), "-t", "lightning.trainer.max_steps=6"], terminal=True)
    model = trainer.lightning_module
    assert trainer.global_step == 6 and model.tau == 0.2
    assert "5/6 steps" in stdout and "6/6 steps" in stdout
    step6 = load_concept(run_dir / "concepts" / "step_000006.safetensors")
    assert step6.train_tau == 0.2 and not torch.equal(step6.embedding, trained["embedding"])
    # The targets went on from the restored moving average instead of being initialised again.
    config = load_config([PERFUSION, first_run.config], ["lightning.trainer.max_steps=6"])
    continued = replay_i_super(config, seed=23, ranks=[0], start_step=4, i_super=trained["i_super"])
    assert (step6.i_super - continued).abs().max() < 1e-5
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert len(list((run_dir / "configs").iterdir())) == 3
    assert max(e.step for e in tensorboard(run_dir).Scalars("train/loss")) > 4


def test_resume_refuses_other_frozen_weights(first_run, tmp_path):
    # Another seed gives the tiny model other random (frozen) U-Net, VAE and text encoder weights.
    with pytest.raises(CheckpointError, match="different frozen weights"):
        run_main(["--resume", str(copy_run(first_run, tmp_path)), "-t", "--seed", "99", "lightning.trainer.max_steps=8"])


def test_ctrl_c_saves_the_concept_and_a_resume_checkpoint(first_run, tmp_path):
    ctrl_c = CtrlC(at_step=3)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:  # the command's exit status, as after a real Ctrl-C
            run_cli(lambda: run_main(["--base", str(PERFUSION), str(first_run.config), "-t", "--logdir",
                                      str(tmp_path), "lightning.trainer.max_steps=10"], extra_callbacks=[ctrl_c]))
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C after the first
    assert exit_info.value.code == 130          # as for sampling
    (run_dir,) = tmp_path.iterdir()
    saved = load_concept(run_dir / "concepts" / "last.safetensors")
    assert saved.superclass == "cat" and saved.tensors().keys() == ctrl_c.concept.keys()
    assert all(torch.equal(saved.tensors()[k], v) for k, v in ctrl_c.concept.items())  # the concept at step 3
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and torch.equal(ckpt["state_dict"]["embedding"], ctrl_c.concept["embedding"])


class SigTerm(CtrlC):
    """Sends this process SIGTERM (what `kill` and cluster pre-emption send) at optimizer step `at_step`."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step and self.concept is None:
            self.concept = {k: v.clone() for k, v in pl_module.concept().tensors().items()}
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_like_ctrl_c(first_run, tmp_path):
    sigterm = SigTerm(at_step=3)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: run_main(["--base", str(PERFUSION), str(first_run.config), "-t", "--logdir",
                                      str(tmp_path), "lightning.trainer.max_steps=10"], extra_callbacks=[sigterm]))
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert exit_info.value.code == 130
    (run_dir,) = tmp_path.iterdir()
    saved = load_concept(run_dir / "concepts" / "last.safetensors")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] in (3, 4) and saved.tensors().keys() == sigterm.concept.keys()


def test_without_train_flag_only_checks(first_run, tmp_path):
    trainer, stdout = run_main(["--base", str(PERFUSION), str(first_run.config), "--logdir", str(tmp_path / "logs")])
    assert trainer is None and "nothing trained" in stdout and "2 items" in stdout
    assert "416 trainable parameters" in stdout  # the embedding (64) and o*_V (352)
    assert not (tmp_path / "logs").exists()
    with pytest.raises(ConfigError, match="lightning.trainer: Precision 'bogus'"):  # trainer settings are checked too
        run_main(["--base", str(PERFUSION), str(first_run.config), "--logdir", str(tmp_path / "logs"),
                  "--precision", "bogus"])


# ----------------------------------------------------------------------------- DDP
def replay_i_super(config, seed: int, ranks: list[int], start_step: int = 0, i_super=None) -> torch.Tensor:
    """i_super at `lightning.trainer.max_steps`, recomputed in this process from the batches that `ranks`
    drew from `start_step` on (continuing the moving average `i_super` of a resumed run).

    Each rank draws its samples with the step sampler seeded (seed, rank, start step) and its
    templates from the dataset generator seeded with seed + rank (SeedPerRank); the targets read the
    target templates in turn by step (or, with target_templates=captions, those captions). With equal batch
    sizes the mean over ranks of each rank's batch mean, which the model all-reduces, is the mean
    over the concatenated batch. i_super depends only on the frozen text encoder, not on training.
    """
    trainer, batch_size = config.lightning.trainer, config.data.batch_size
    micro_batches = (trainer.max_steps - start_step) * trainer.accumulate_grad_batches
    per_rank = []
    for rank in ranks:
        torch.manual_seed(seed + rank)
        dataset = instantiate_from_config(config.data)
        samples = trainer.max_steps * batch_size * trainer.accumulate_grad_batches
        sampler = ShuffledPassSampler(len(dataset), samples, derive_seed(seed, rank, start_step))
        per_rank.append(list(DataLoader(dataset, batch_size=batch_size, sampler=sampler))[:micro_batches])
    model = build_model(config, seed=seed)
    if i_super is not None:
        model.i_super.copy_(i_super)
        model.initialized.fill_(True)
    for k, batches in enumerate(zip(*per_rank)):
        if model.target_templates is None:   # the images' captions, concatenated over ranks
            captions = [c for batch in batches for c in batch["caption"]]
            captions_super = [c for batch in batches for c in batch["caption_super"]]
            model.update_targets(captions, captions_super)
        else:   # every rank reads the same templates, taken in turn by optimizer step
            step = start_step + k // trainer.accumulate_grad_batches
            model.update_targets(*model.template_targets(batch_size, step))
    return model.i_super.clone()


def test_two_process_ddp_on_cpu(first_run, tmp_path):
    """Two CPU processes (gloo): one run directory, and both ranks end with the same concept
    (PerfusionLatentDiffusion.on_train_end all-gathers it and raises if the ranks differ)."""
    argv = ["--base", str(PERFUSION), str(first_run.config), "-t", "--accelerator", "cpu", "--devices", "2",
            "--strategy", "ddp", "--logdir", str(tmp_path / "logs"), "lightning.trainer.max_steps=3",
            "model.params.target_templates=captions"]   # targets from each rank's own batch
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 8 = 2 x 2 x 2 device(s)" in result.stdout
    (run_dir,) = (tmp_path / "logs").iterdir()
    assert sorted(p.name for p in (run_dir / "concepts").iterdir()) == ["last.safetensors", "step_000002.safetensors"]
    concept = load_concept(run_dir / "concepts" / "last.safetensors")
    assert concept.superclass == "cat"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert len(list((run_dir / "configs").iterdir())) == 1  # rank 1 wrote nothing of its own
    # The targets are averaged over both ranks' batches (update_targets all-reduces), not rank 0's alone.
    config = load_config([PERFUSION, first_run.config], ["lightning.trainer.max_steps=3",
                                                         "model.params.target_templates=captions"])
    assert (concept.i_super - replay_i_super(config, seed=23, ranks=[0, 1])).abs().max() < 1e-5
    assert (concept.i_super - replay_i_super(config, seed=23, ranks=[0])).abs().max() > 1e-3


# ----------------------------------------------------------------------------- command line
def test_train_flag_forms_and_overrides_after_base():
    assert main.parse_args(["-b", "a.yaml", "-t"]).train
    assert main.parse_args(["-b", "a.yaml", "-t", "True"]).train
    assert not main.parse_args(["-b", "a.yaml", "--train", "False"]).train
    args = main.parse_args(["--base", "a.yaml", "b.yaml", "x.y=1", "-t", "z=2"])
    assert args.base == ["a.yaml", "b.yaml"] and args.overrides == ["x.y=1", "z=2"] and args.train
    args = main.parse_args(["k=v", "--base", "a.yaml", "-t"])
    assert args.base == ["a.yaml"] and args.overrides == ["k=v"]


@pytest.mark.parametrize("flags, expected", [
    (["--gpus", "0,"], {"accelerator": "gpu", "devices": [0]}),
    (["--gpus", "0,1"], {"accelerator": "gpu", "devices": [0, 1]}),
    (["--devices", "2", "--accelerator", "cpu", "--strategy", "ddp"],
     {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}),
    (["--precision", "bf16-mixed"], {"precision": "bf16-mixed", "max_steps": 5}),
])
def test_device_flags_override_the_trainer_section(flags, expected):
    config = OmegaConf.create({"lightning": {"trainer": {"max_steps": 5, "devices": 1, "accelerator": "auto"}}})
    settings = main.trainer_settings(config, main.parse_args(["-b", "a.yaml", *flags]))
    assert expected.items() <= settings.items()


@pytest.mark.parametrize("flags, message", [
    (["--gpus", "0,", "--devices", "2"], "either --gpus or --devices"),
    (["--gpus", "0,", "--accelerator", "cpu"], "conflicts"),
    (["--devices", "two"], "'two'"),
])
def test_bad_device_flags(flags, message):
    config = OmegaConf.create({"lightning": {"trainer": {"max_steps": 5}}})
    with pytest.raises(ConfigError, match=message):
        main.trainer_settings(config, main.parse_args(["-b", "a.yaml", *flags]))


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main.main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


@pytest.mark.parametrize("extra, message", [
    (["lightning.trainer.max_step=2"], "lightning.trainer: "),  # typo in a Trainer argument
    (["lightning.trainer.precision=bogus"], "Precision 'bogus' is invalid"),
    (["lightning.trainer.max_steps=null"], "max_steps must be a positive"),
    (["lightning.callbacks.image_loger.every_n_steps=2"], "image_loger is unknown"),
    (["lightning.callbacks.image_logger.every_n_step=2"], "lightning.callbacks.image_logger: "),
    (["lightning.callbacks.image_logger.every_n_steps=-1"], "lightning.callbacks.image_logger: every_n_steps must be"),
    (["lightning.callbacks.ema.decay=2"], "lightning.callbacks.ema.decay must be a number in (0, 1), got 2"),
    (["lightning.callbacks.ema.decy=0.9"], "lightning.callbacks.ema.decy is unknown"),
    (["lightning.callbacks.ema.update_starting_at_step=-1"], "update_starting_at_step must be a whole number >= 0"),
    (["max_steps"], "not of the form key=value"),
    (["data.params.data_root=/no/such/folder"], "/no/such/folder"),
    (["data.params.colour=red"], "data: cannot build"),
    (["model.params.colour=red"], "model: cannot build"),
    (["model.params.placeholder=two words"], "'two words' is 2 CLIP tokens"),
    (["data.params.size=30"], "data.params.size 30 is not a multiple of 4"),
    (["--name", "../../escaped"], "--name '../../escaped': a plain name for the run folder"),
    (["--name", "a/b"], "--name 'a/b': a plain name"),
    (["--name", "n" * 300], "--name is 300 bytes; at most 120"),
])
def test_bad_overrides_give_one_line_errors(first_run, extra, message, capsys, tmp_path):
    err = cli_error(["--base", str(PERFUSION), str(first_run.config), "-t", "--logdir", str(tmp_path), *extra], capsys)
    assert message in err
    assert not any(tmp_path.iterdir()) and not any(tmp_path.parent.glob("escaped*"))  # no run directory anywhere


def test_bad_resume_paths(tmp_path, capsys):
    assert "no such run directory" in cli_error(["--resume", str(tmp_path / "nope"), "-t"], capsys)
    assert "checkpoints/last.ckpt not found" in cli_error(["--resume", str(tmp_path), "-t"], capsys)
    assert "cannot be combined" in cli_error(["--resume", str(tmp_path), "--name", "x", "-t"], capsys)


def test_command_line_exit_status_for_a_missing_config(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--base", str(tmp_path / "nope.yaml"), "-t"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: config file not found"


def test_only_user_errors_become_one_line(capsys):
    import errno

    from ldm.errors import MissingFileError, UserError

    def fails(err):
        def main():
            raise err
        return main

    for err in (UserError("x.yaml: bad\nvalue"), MissingFileError("c.safetensors: not found"),
                OSError(errno.ENOSPC, "No space left on device", "out/a.png")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(fails(err))
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ValueError, match="a bug"):      # anything else keeps its traceback
        run_cli(fails(ValueError("a bug")))
    with pytest.raises(OSError):
        run_cli(fails(OSError(errno.EIO, "I/O error")))


def test_perfusion_warnings_print_as_one_line(capsys):
    import warnings

    from ldm.errors import PerfusionWarning

    def main():
        warnings.warn("a.safetensors and b.safetensors:\n too alike", PerfusionWarning)
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main)
    assert exit_info.value.code == 0
    err = capsys.readouterr().err
    assert err == "warning: a.safetensors and b.safetensors: too alike\n"
    assert warnings.showwarning.__name__ != "one_line"     # restored after the command


def test_run_folders_started_in_the_same_second_are_distinct(tmp_path):
    now = "2026-01-01T00-00-00"
    first = main.new_run_dir(str(tmp_path), "x", now, create=True)
    second = main.new_run_dir(str(tmp_path), "x", now, create=True)
    assert first != second and first.is_dir() and second.is_dir()
    assert main.new_run_dir(str(tmp_path), "x", now, create=False) == tmp_path / f"{now}_x_2"
    assert not (tmp_path / f"{now}_x_2").exists()      # a name only: checking a setup writes nothing


def test_resume_refuses_unreadable_checkpoints_before_writing(first_run, tmp_path, capsys):
    import pickle
    import shutil

    run = tmp_path / "run"
    shutil.copytree(first_run.run_dir, run)
    ckpt = run / "checkpoints" / "last.ckpt"

    class Runs:          # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("this ran",))

    for content in (b"", ckpt.read_bytes()[:200], pickle.dumps(Runs())):
        ckpt.write_bytes(content)
        configs = sorted((run / "configs").iterdir())
        assert "cannot be read as a resume checkpoint" in cli_error(["--resume", str(run), "-t"], capsys)
        assert sorted((run / "configs").iterdir()) == configs       # nothing added to the run


def test_resume_keeps_the_concept_it_started(first_run, capsys):
    err = cli_error(["--resume", str(first_run.run_dir), "-t", "model.params.superclass=dog"], capsys)
    assert "model.params.superclass was 'cat' in the run, got 'dog'" in err


@pytest.mark.parametrize("extra, message", [
    (["a.b="], "'a' is not a config section"),
    (["model.params.colour="], "model.params.colour is not in the config and the value is empty"),
])
def test_overrides_that_set_nothing_are_refused(first_run, extra, message, capsys, tmp_path):
    err = cli_error(["--base", str(PERFUSION), str(first_run.config), "-t", "--logdir", str(tmp_path), *extra], capsys)
    assert message in err


def test_configs_without_a_lightning_section_or_as_a_list(first_run, tmp_path, capsys):
    from ldm.build import load_config

    config = OmegaConf.to_container(load_config([PERFUSION, first_run.config]))
    del config["lightning"]
    bare = tmp_path / "bare.yaml"
    OmegaConf.save(OmegaConf.create(config), bare)
    err = cli_error(["--base", str(bare), "--logdir", str(tmp_path / "logs")], capsys)
    assert "lightning.trainer.max_steps must be a positive number" in err
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    assert "list.yaml: expected sections (model:, data:, lightning:) at the top level, got a list" in \
        cli_error(["--base", str(listed)], capsys)


def test_a_disk_that_fills_during_training_is_one_line_naming_a_path(tmp_path):
    """Writes refused by the operating system mid-run (a file-size limit here, as a full disk refuses them):
    no thread's traceback, one error line that names the file or the run folder."""
    script = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
from ldm.cli import run_cli
from ldm.train import main
sys.argv = ["main.py"]
run_cli(lambda: main(["--base", {str(PERFUSION)!r}, "-t", "--logdir", {str(tmp_path)!r}, "--accelerator", "cpu",
                      "lightning.trainer.max_steps=300", "lightning.callbacks.image_logger.every_n_steps=2"]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and f"error: {tmp_path}" in errors[0] and errors[0].endswith("File too large"), errors
