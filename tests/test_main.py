"""main.py end to end: real tiny LatentDiffusion runs of a few steps on 32x32 photos, in-process."""
from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from skimage import data as skdata
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from ldm.build import ConfigError
from ldm.callbacks import StepProgressBar
from ldm.checkpoint import CheckpointError
from ldm.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/tiny/v1-tiny.yaml"
TEST_MODEL = "model.target=tests.training_models.ConceptLDM"


@pytest.fixture(scope="module")
def one_thread():
    """Two OpenMP threads on a busy 2-core machine slow the tiny model down a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_concept(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, picture in (("cat.jpg", skdata.chelsea()), ("cup.png", skdata.coffee())):
        Image.fromarray(picture).save(root / name)
        mask = np.zeros(picture.shape[:2], np.uint8)
        mask[:, picture.shape[1] // 4: 3 * picture.shape[1] // 4] = 255
        (root / "mask").mkdir(exist_ok=True)
        Image.fromarray(mask, mode="L").save(root / "mask" / f"{Path(name).stem}.png")
    return root


def write_config(path: Path, data_root: Path, max_steps: int = 4) -> Path:
    config = {
        "data": {"target": "ldm.data.personalized.PersonalizedDataset",
                 "params": {"data_root": str(data_root), "placeholder": "sks", "superclass": "cat", "size": 32},
                 "batch_size": 2, "num_workers": 0},
        "lightning": {"trainer": {"max_steps": max_steps, "accumulate_grad_batches": 2, "log_every_n_steps": 1},
                      "callbacks": {"concept_checkpoint": {"every_n_steps": 2}, "checkpoint": {"every_n_steps": 2},
                                    "image_logger": {"every_n_steps": 2, "max_images": 2}}},
    }
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def run_main(argv: list[str]):
    out = io.StringIO()
    with redirect_stdout(out):
        trainer = main.run(argv)
    return trainer, out.getvalue()


def tensorboard(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("train")
    config = write_config(base / "cat.yaml", write_concept(base / "concept"))
    trainer, stdout = run_main(["--base", str(TINY), str(config), "-t", "--name", "cat", "--logdir", str(base / "logs"),
                                "--accelerator", "cpu", TEST_MODEL, "model.params.learning_rate=0.0003"])
    (run_dir,) = (base / "logs").iterdir()
    return SimpleNamespace(trainer=trainer, stdout=stdout, run_dir=run_dir, base=base, config=config)


def test_run_directory_layout(first_run):
    run_dir = first_run.run_dir
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_cat", run_dir.name)
    assert sorted(p.name for p in (run_dir / "concepts").iterdir()) == \
        ["last.safetensors", "step_000002.safetensors", "step_000004.safetensors"]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == \
        [f"{name}_step_00000{s}.png" for name in ("inputs", "mask", "reconstruction") for s in (2, 4)]
    (saved,) = (run_dir / "configs").iterdir()
    config = OmegaConf.load(saved)
    assert config.model.target == "tests.training_models.ConceptLDM"  # merged and overridden
    assert config.model.params.learning_rate == 0.0003 and config.model.params.unet_config.params.model_channels == 32
    assert config.lightning.trainer.accelerator == "cpu" and config.lightning.seed == 23


def test_overrides_reach_the_model(first_run):
    model = first_run.trainer.lightning_module
    assert type(model).__name__ == "ConceptLDM" and model.learning_rate == 0.0003
    assert first_run.trainer.optimizers[0].param_groups[0]["lr"] == 0.0003


def test_progress_is_counted_in_optimizer_steps(first_run):
    trainer = first_run.trainer
    assert trainer.global_step == 4
    assert trainer.num_training_batches == 8  # 4 steps x accumulate 2: one loader pass is the whole run
    assert trainer.current_epoch <= 1
    (bar,) = [cb for cb in trainer.callbacks if isinstance(cb, StepProgressBar)]
    assert bar.train_progress_bar.n == 4 and bar.train_progress_bar.total == 4
    assert "4/4 steps" in first_run.stdout and "Epoch" not in first_run.stdout
    assert "effective batch 4 = 2 x 2 x 1 device(s)" in first_run.stdout


def test_tensorboard_has_loss_learning_rate_and_images(first_run):
    events = tensorboard(first_run.run_dir)
    assert {"train/loss", "lr-AdamW"} <= set(events.Tags()["scalars"])
    losses = events.Scalars("train/loss")
    assert len(losses) >= 4 and all(np.isfinite(e.value) and e.value > 0 for e in losses)
    assert max(e.step for e in losses) <= 4
    assert [e.value for e in events.Scalars("lr-AdamW")][-1] == pytest.approx(0.0003)
    for name in ("inputs", "reconstruction", "mask"):
        assert [e.step for e in events.Images(f"train/{name}")] == [2, 4]
        assert events.Images(f"train/{name}")[0].width == 2 * 32 + 3 * 2  # two images in one row, padding 2


def test_image_logger_runs_in_eval_mode_and_restores_train_mode(first_run):
    model = first_run.trainer.lightning_module
    assert model.logged_in_training_mode is False
    assert model.training and model.model.training and not model.first_stage_model.training


def test_concept_and_resume_checkpoint_contents(first_run):
    run_dir, model = first_run.run_dir, first_run.trainer.lightning_module
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    last = load_file(run_dir / "concepts" / "last.safetensors")
    assert last.keys() == trained.keys() and all(torch.equal(last[k], trained[k]) for k in trained)
    with safe_open(run_dir / "concepts" / "step_000002.safetensors", "pt") as f:
        assert f.metadata()["step"] == "2"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["optimizer_states"]
    assert set(ckpt["state_dict"]) == set(trained)  # frozen VAE / text encoder left out
    frozen = sum(1 for p in model.parameters() if not p.requires_grad)
    assert ckpt["frozen_parameters"]["omitted"] == frozen > 0


def copy_run(first_run, tmp_path) -> Path:
    """A copy of the first run's directory, so that resuming it leaves the shared run untouched."""
    return Path(shutil.copytree(first_run.run_dir, tmp_path / first_run.run_dir.name))


def test_resume_restores_weights_and_continues_the_step_count(first_run, tmp_path):
    run_dir = copy_run(first_run, tmp_path)
    trained = load_file(run_dir / "concepts" / "last.safetensors")
    # Nothing left to do at max_steps=4: the restored model is exactly the trained one.
    trainer, _ = run_main(["--resume", str(run_dir / "checkpoints" / "last.ckpt"), "-t"])
    assert trainer.global_step == 4
    state = trainer.lightning_module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    # Two more steps, with the first run's overrides (learning rate) kept from its saved config.
    trainer, stdout = run_main(["--resume", str(run_dir), "-t", "lightning.trainer.max_steps=6"])
    assert trainer.global_step == 6 and trainer.lightning_module.learning_rate == 0.0003
    assert "6/6 steps" in stdout
    assert (run_dir / "concepts" / "step_000006.safetensors").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert len(list((run_dir / "configs").iterdir())) == 3
    assert max(e.step for e in tensorboard(run_dir).Scalars("train/loss")) > 4


def test_resume_refuses_other_frozen_weights(first_run, tmp_path):
    # Another seed gives the tiny model other random (frozen) VAE and text encoder weights.
    with pytest.raises(CheckpointError, match="different frozen weights"):
        run_main(["--resume", str(copy_run(first_run, tmp_path)), "-t", "--seed", "99", "lightning.trainer.max_steps=8"])


def test_ctrl_c_saves_the_concept_and_a_resume_checkpoint(first_run, tmp_path):
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_info:  # Lightning exits with status 1 after Ctrl-C
            run_main(["--base", str(TINY), str(first_run.config), "-t", "--logdir", str(tmp_path), TEST_MODEL,
                      "model.params.interrupt_at_step=3", "lightning.trainer.max_steps=10"])
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C after the first
    assert exit_info.value.code == 1
    (run_dir,) = tmp_path.iterdir()
    with safe_open(run_dir / "concepts" / "last.safetensors", "pt") as f:
        assert f.metadata()["step"] == "3"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_without_train_flag_only_checks(first_run, tmp_path):
    trainer, stdout = run_main(["--base", str(TINY), str(first_run.config), "--logdir", str(tmp_path / "logs"),
                                TEST_MODEL])
    assert trainer is None and "nothing trained" in stdout and "2 items" in stdout
    assert not (tmp_path / "logs").exists()
    with pytest.raises(ConfigError, match="lightning.trainer: Precision 'bogus'"):  # trainer settings are checked too
        run_main(["--base", str(TINY), str(first_run.config), "--logdir", str(tmp_path / "logs"), TEST_MODEL,
                  "--precision", "bogus"])


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
    (["lightning.callbacks.image_logger.every_n_step=2"], "lightning.callbacks: "),
    (["max_steps"], "not of the form key=value"),
    (["data.params.data_root=/no/such/folder"], "/no/such/folder"),
    (["data.params.colour=red"], "data: cannot build"),
    (["model.params.beta=0.7"], "model: cannot build"),
])
def test_bad_overrides_give_one_line_errors(first_run, extra, message, capsys, tmp_path):
    err = cli_error(["--base", str(TINY), str(first_run.config), "-t", "--logdir", str(tmp_path), *extra], capsys)
    assert message in err
    assert not any(tmp_path.iterdir())  # no run directory for a run that could not start


def test_bad_resume_paths(tmp_path, capsys):
    assert "no such run directory" in cli_error(["--resume", str(tmp_path / "nope"), "-t"], capsys)
    assert "checkpoints/last.ckpt not found" in cli_error(["--resume", str(tmp_path), "-t"], capsys)
    assert "cannot be combined" in cli_error(["--resume", str(tmp_path), "--name", "x", "-t"], capsys)


def test_command_line_exit_status_for_a_missing_config(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--base", str(tmp_path / "nope.yaml"), "-t"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: config file not found"
