"""One shared tiny Perfusion model and concepts trained on it (1 step each), for the sampling tests.

Built once per process: the covariance is estimated once and written to a file that the model,
the concepts and the CLI configs all reference, so every test sees the same fingerprints.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.build import load_config
from ldm.perfusion.concepts import Concept
from ldm.perfusion.covariance import estimate_covariance, save_covariance
from ldm.perfusion.inference import unload_concepts
from ldm.perfusion.prompts import superclass_token_ids
from tests.conftest import ROOT, TINY_PERFUSION, tiny_perfusion_model, train_one_step

_STATE: dict = {}


def workdir() -> Path:
    if "dir" not in _STATE:
        path = Path(tempfile.mkdtemp(prefix="perfusion-sample-tests-"))
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        _STATE["dir"] = path
    return _STATE["dir"]


def shared_model():
    """The tiny Perfusion model (seed 0 weights) with its covariance file; no concepts loaded."""
    if "model" not in _STATE:
        model = tiny_perfusion_model().eval()
        encoder = model.cond_stage_model
        C = estimate_covariance(encoder, ROOT / "data/captions.txt", 300)
        path = save_covariance(workdir() / "covariance.safetensors", C,
                               {"text_encoder_fingerprint": encoder.fingerprint()})
        model.covariance_path = str(path)
        model.ensure_covariance()
        _STATE["model"], _STATE["covariance"] = model, path
    model = _STATE["model"]
    unload_concepts(model)
    return model


def cli_config() -> Path:
    """The tiny Perfusion config that builds exactly `shared_model()` (same seed, same covariance file)."""
    path = workdir() / "perfusion-tiny-test.yaml"
    if not path.exists():
        shared_model()
        config = load_config([TINY_PERFUSION], [f"model.params.covariance_path={_STATE['covariance']}",
                                                "lightning.seed=0"])
        OmegaConf.save(config, path)
    return path


def trained_concept(superclass: str = "cat", seed: int = 0) -> Concept:
    """A concept with placeholder '*', trained one step from scratch on a seeded random batch."""
    key = ("concept", superclass, seed)
    if key not in _STATE:
        model = shared_model()
        saved = model.superclass, model.superclass_ids
        model.superclass = superclass
        model.superclass_ids = superclass_token_ids(model.cond_stage_model.tokenizer, superclass)
        model.initialized.fill_(False)   # a new concept: initialised again from its first batch
        try:
            concept = train_one_step(model, seed).concept()   # copies: the model's tensors change when the next concept trains
            _STATE[key] = replace(concept, embedding=concept.embedding.detach().clone(),
                                  i_star=concept.i_star.clone(), i_super=concept.i_super.clone(),
                                  o_star_v=[v.detach().clone() for v in concept.o_star_v])
        finally:
            model.superclass, model.superclass_ids = saved
            model.eval()
            unload_concepts(model)
    return _STATE[key]


def concept_file(superclass: str = "cat", seed: int = 0) -> Path:
    from ldm.perfusion.concepts import save_concept

    path = workdir() / f"{superclass}-{seed}.safetensors"
    if not path.exists():
        save_concept(path, trained_concept(superclass, seed))
    return path


@pytest.fixture
def model():
    """The shared tiny model, its concepts unloaded after the test."""
    m = shared_model()
    yield m
    unload_concepts(m)


@pytest.fixture(scope="module")
def cat():
    return trained_concept("cat", seed=0)


@pytest.fixture(scope="module")
def dog():
    return trained_concept("dog", seed=1)
