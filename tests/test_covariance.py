"""Text-encoding covariance: float64 accumulation, token rules, file format, and the CLI."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.perfusion.covariance import (CovarianceAccumulator, CovarianceError, accumulate, add_ridge, eigen_report,
                                      estimate_covariance, invert, iter_captions, load_covariance, save_covariance,
                                      token_mask)

REPO = Path(__file__).resolve().parents[1]
from ldm.perfusion import estimate_covariance as est  # noqa: E402

TINY = {"sd1": REPO / "configs" / "tiny" / "v1-tiny.yaml", "sd2": REPO / "configs" / "tiny" / "v2-tiny.yaml"}
CAPTIONS = REPO / "data" / "captions.txt"


def first_captions(n: int) -> list[str]:
    return list(iter_captions(CAPTIONS, n))


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def tiny(request):
    return request.param, est.build_text_encoder(str(TINY[request.param]), None, seed=0)


def direct_covariance(encoder, captions, rule):
    """Reference: one forward pass over all captions, then E^T E / n in float64."""
    with torch.no_grad():
        tokens = encoder.tokenize(captions)
        enc = encoder.encode(captions).double()
    rows = enc[token_mask(tokens, rule, encoder.tokenizer.eot_token_id)]
    return rows.T @ rows / rows.shape[0], rows.shape[0]


def test_token_rules_sd1_and_sd2_padding():
    sot, eot = 49406, 49407
    sd1 = torch.tensor([[sot, 10, 11, eot, eot, eot], [sot, eot, eot, eot, eot, eot]])
    sd2 = torch.tensor([[sot, 10, 0, 11, eot, 0], [sot, 5, 6, 7, 8, eot]])   # id 0 is "!" inside, padding after
    assert token_mask(sd1, "all", eot).all()
    assert token_mask(sd1, "sot-words-eot", eot).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert token_mask(sd1, "words", eot).tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert token_mask(sd2, "words", eot).tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]]
    assert token_mask(sd2, "sot-words-eot", eot).tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="unknown token rule"):
        token_mask(sd1, "padding", eot)


def test_accumulator_is_exact_float64_second_moment():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=gen) + torch.tensor([3.0, -1.0, 0.5])
    mask = torch.rand(5, 7, generator=gen) > 0.3
    acc = CovarianceAccumulator(3)
    acc.update(x[:2], mask[:2])
    acc.update(x[2:], mask[2:])
    rows = x[mask].double()
    torch.testing.assert_close(acc.finalize(), rows.T @ rows / rows.shape[0], rtol=1e-14, atol=0)
    assert acc.tokens == int(mask.sum()) and acc.sequences == 5
    c, a = add_ridge(acc.finalize(), 0.1)
    torch.testing.assert_close(c, acc.finalize(0.1))
    assert a == pytest.approx(0.1 * float(torch.trace(acc.finalize())) / 3)
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.zeros(2, 7, 4))


@pytest.mark.parametrize("rule", ["all", "sot-words-eot", "words"])
def test_tiny_encoder_matches_direct_computation(tiny, rule):
    _, encoder = tiny
    captions = first_captions(40)
    acc, _ = accumulate(encoder, iter(captions), token_rule=rule, batch_size=16)
    reference, n = direct_covariance(encoder, captions, rule)
    assert acc.tokens == n and acc.sequences == 40
    torch.testing.assert_close(acc.finalize(), reference, rtol=1e-5, atol=1e-6)
    if rule == "all":
        assert n == 40 * 77


def test_batch_size_does_not_change_the_result(tiny):
    _, encoder = tiny
    captions = first_captions(50)
    results = [accumulate(encoder, captions, batch_size=b) for b in (1, 7, 50)]
    for acc, digest in results[1:]:
        assert acc.tokens == results[0][0].tokens and digest == results[0][1]
        torch.testing.assert_close(acc.finalize(), results[0][0].finalize(), rtol=1e-6, atol=1e-7)


def test_cli_end_to_end(tmp_path, tiny):
    name, encoder = tiny
    out = tmp_path / "cov.safetensors"
    assert est.main(["--config", str(TINY[name]), "--out", str(out), "--max_captions", "60", "--batch_size", "25",
                     "--ridge", "1e-3", "--device", "cpu"]) == 0
    c, c_inv, meta = load_covariance(out)
    reference, n = direct_covariance(encoder, first_captions(60), "all")
    reference, _ = add_ridge(reference, 1e-3)
    torch.testing.assert_close(c, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c @ c_inv, torch.eye(c.shape[0], dtype=torch.float64), atol=1e-8, rtol=0)
    assert meta["text_encoder_fingerprint"] == encoder.fingerprint()
    assert (meta["captions"], meta["tokens"], meta["token_rule"], meta["ridge"]) == ("60", str(n), "all", "0.001")
    assert meta["format"] == "perfusion-covariance" and meta["version"] == "1"


def test_cli_loads_weights_from_a_base_checkpoint(tmp_path, tiny):
    name, _ = tiny
    donor = est.build_text_encoder(str(TINY[name]), None, seed=123)
    ckpt = tmp_path / "base.safetensors"
    save_file({f"cond_stage_model.{k}": v.contiguous() for k, v in donor.state_dict().items()}, str(ckpt))
    out = tmp_path / "cov.safetensors"
    est.main(["--config", str(TINY[name]), "--ckpt", str(ckpt), "--out", str(out), "--max_captions", "30",
              "--ridge", "1e-3", "--device", "cpu"])
    meta = load_covariance(out)[2]
    assert meta["text_encoder_fingerprint"] == donor.fingerprint() and meta["base_checkpoint"] == "base.safetensors"


def test_gzip_captions_and_max_captions(tmp_path):
    lines = first_captions(30)
    gz = tmp_path / "caps.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(lines) + "\n")
    assert list(iter_captions(gz)) == lines
    assert list(iter_captions(gz, 4)) == lines[:4]


def test_estimate_covariance_library_call_is_invertible(tiny):
    """The library entry point (used when a config names no covariance file): a file path, a cap on
    captions, and the default ridge, which makes even the rank-deficient C of a random tiny encoder
    (final LayerNorm without bias) invertible."""
    _, encoder = tiny
    c = estimate_covariance(encoder, CAPTIONS, 40)
    raw, _ = direct_covariance(encoder, first_captions(40), "all")
    assert eigen_report(raw)["eig_min"] < 1e-9 * eigen_report(raw)["eig_max"]        # singular without a ridge
    torch.testing.assert_close(c, add_ridge(raw, 1e-6)[0], rtol=1e-5, atol=1e-6)
    assert eigen_report(c)["condition_number"] < c.shape[0] * 1e6
    invert(c)


def test_caption_file_errors(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\t\n\n")
    args = ["--config", str(TINY["sd1"]), "--out", str(tmp_path / "c.safetensors")]
    with pytest.raises(ValueError, match="blank.txt: no captions"):
        est.main(args + ["--captions", str(blank)])
    with pytest.raises(FileNotFoundError, match="missing.txt: caption file not found"):
        est.main(args + ["--captions", str(tmp_path / "missing.txt")])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        est.main(args + ["--captions", str(latin)])
    assert not (tmp_path / "c.safetensors").exists()
    encoder = est.build_text_encoder(str(TINY["sd1"]), None, seed=0)
    with pytest.raises(ValueError, match="blank.txt: no captions"):
        estimate_covariance(encoder, blank)


def test_random_weights_refused_for_full_size_encoders(tmp_path):
    with pytest.raises(ValueError, match="--ckpt is required"):
        est.build_text_encoder(str(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"), None, seed=0)


def test_cli_reports_one_line_error(tmp_path):
    blank = tmp_path / "empty.txt"
    blank.write_text("\n\n")
    result = subprocess.run([sys.executable, str(REPO / "data" / "estimate_covariance.py"), "--config",
                             str(TINY["sd1"]), "--captions", str(blank), "--out", str(tmp_path / "c.safetensors")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {blank}: no captions (the file is empty or has only blank lines)"]


def test_out_that_is_a_folder_is_refused_before_the_work(tmp_path):
    with pytest.raises(ValueError, match="it is a folder"):
        est.main(["--config", str(TINY["sd1"]), "--captions", str(tmp_path / "not-read.txt"), "--out", str(tmp_path)])


def test_file_format_round_trip_and_bad_files(tmp_path):
    a = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    path = save_covariance(tmp_path / "c.safetensors", c, {"token_rule": "all"})
    c2, c_inv, meta = load_covariance(path)
    torch.testing.assert_close(c2, c, rtol=0, atol=0)
    torch.testing.assert_close(c_inv, torch.linalg.inv(c), rtol=1e-10, atol=1e-10)
    assert meta["token_rule"] == "all" and meta["dim"] == "6"

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_covariance(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CovarianceError, match="corrupt.safetensors"):
        load_covariance(corrupt)
    other = tmp_path / "weights.safetensors"
    save_file({"C": c}, str(other))
    with pytest.raises(CovarianceError, match="not a covariance file"):
        load_covariance(other)
    future = tmp_path / "future.safetensors"
    header = {"format": "perfusion-covariance", "version": "2", "dim": "6"}
    save_file({"C": c, "C_inv": c_inv}, str(future), metadata=header)
    with pytest.raises(CovarianceError, match="version '2' is not supported"):
        load_covariance(future)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"C": c, "C_inv": c.clone()}, str(mismatched), metadata={**header, "version": "1"})
    with pytest.raises(CovarianceError, match="not the inverse"):
        load_covariance(mismatched)


def test_eigen_report_and_singular_matrix():
    report = eigen_report(torch.diag(torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64)))
    assert report == {"eig_min": 0.5, "eig_max": 4.0, "condition_number": 8.0}
    singular = torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert eigen_report(singular)["condition_number"] == float("inf")
    with pytest.raises(CovarianceError, match="singular or nearly so"):
        invert(singular)
    with pytest.raises(CovarianceError, match="condition number 1e"):
        invert(torch.diag(torch.tensor([1.0, 1e-13], dtype=torch.float64)))
    expected = torch.diag(torch.tensor([1 / 1.25, 1 / 0.25], dtype=torch.float64))  # ridge 0.5 * mean eig 0.5
    torch.testing.assert_close(invert(add_ridge(singular, 0.5)[0]), expected)


def test_out_that_is_not_a_covariance_is_never_replaced(tmp_path, tiny):
    """--out naming a trained concept or a photo is refused before any work; a covariance is replaced."""
    name, _ = tiny
    args = ["--config", str(TINY[name]), "--max_captions", "20", "--device", "cpu"]
    for victim, data in (("concept.safetensors", None), ("photo.jpg", b"\xff\xd8\xff\xe0 a JPEG")):
        path = tmp_path / victim
        if data is None:
            from safetensors.torch import save_file
            save_file({"embedding": torch.zeros(4)}, str(path), metadata={"format": "perfusion-concept"})
        else:
            path.write_bytes(data)
        before = path.read_bytes()
        with pytest.raises(ValueError, match=f"--out {path}: exists and is not a covariance file"):
            est.main(args + ["--out", str(path)])
        assert path.read_bytes() == before
    out = tmp_path / "cov.safetensors"
    with pytest.raises(ValueError, match="--device mps: no Apple GPU"):
        est.main([a for a in args if a != "cpu" and a != "--device"] + ["--out", str(out), "--device", "mps"])
    with pytest.raises(ValueError, match=r"--seed must be a whole number in \[0, 2\^63\)"):
        est.main(args + ["--out", str(out), "--seed", str(10**30)])
    assert est.main(args + ["--out", str(out)]) == 0 and est.main(args + ["--out", str(out), "--ridge", "1e-2"]) == 0
    assert load_covariance(out)[2]["ridge"] == "0.01"


def test_captions_can_come_through_a_pipe(tmp_path):
    """--captions /dev/stdin (read once, as it can only be): the same covariance as from the file."""
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(first_captions(30)) + "\n")
    outs = {}
    for name, source, stdin in (("file", str(captions), None), ("pipe", "/dev/stdin", captions.read_text())):
        outs[name] = tmp_path / f"{name}.safetensors"
        result = subprocess.run([sys.executable, str(REPO / "data" / "estimate_covariance.py"), "--config",
                                 str(TINY["sd1"]), "--captions", source, "--out", str(outs[name]), "--device", "cpu"],
                                input=stdin, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    (c_file, _, meta_file), (c_pipe, _, meta_pipe) = load_covariance(outs["file"]), load_covariance(outs["pipe"])
    assert torch.equal(c_file, c_pipe) and meta_file["captions"] == meta_pipe["captions"] == "30"
