"""The uncentered covariance C = E[e e^T] of text encodings, used by Perfusion's gate (Eq. 3).

`sim(e) = i*^T C^-1 e / i*^T C^-1 i*` measures how much of an encoding lies along the concept's
input `i*` under the C^-1 inner product (ROME's key statistics, Meng et al. 2022, Sec. 3.1). C is
estimated once per text encoder from many captions (data/estimate_covariance.py) and stored in
one versioned safetensors file, referenced from concept files by the encoder's fingerprint.
data/estimate_covariance.py is the command-line front end of `accumulate` and `save_covariance`.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import math
from pathlib import Path
from typing import Iterable, Iterator, Mapping, TextIO

import torch
from tqdm import tqdm

from ldm.errors import MissingFileError, UserError
from ldm.util import atomic_path

FORMAT = "perfusion-covariance"
VERSION = 1
# Which of the 77 positions of a prompt count (see data/estimate_covariance.py and the README):
#   all           - every position: start token, words, end token and the padding after it
#   sot-words-eot - the start token, the words and the first end token (no padding)
#   words         - only the words between start and end tokens
TOKEN_RULES = ("all", "sot-words-eot", "words")
MAX_CONDITION = 1e10
# Relative ridge (times the mean eigenvalue tr(C)/d). Since the largest eigenvalue is at most tr(C),
# it bounds the condition number by d * 1e6, and it moves the eigenvalues of a well-conditioned C
# by a millionth of their mean.
DEFAULT_RIDGE = 1e-6


class CovarianceError(UserError):
    """A covariance file or matrix that cannot be used; the message names the file or the problem."""


def first_eot(tokens: torch.Tensor, eot_token_id: int) -> torch.Tensor:
    """Each row's first end-token position (B,) in token ids (B, L); L for a row without one."""
    is_eot = tokens == eot_token_id
    return torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), torch.full_like(tokens[:, 0], tokens.shape[1]))


def token_mask(tokens: torch.Tensor, rule: str, eot_token_id: int) -> torch.Tensor:
    """Boolean (B, L) mask of the positions that `rule` counts, from token ids (B, L).

    Rows are `[SOT, words..., EOT, padding...]`; the word span ends at the first EOT, so this works
    whether padding is EOT (SD1) or 0 (SD2). A row without EOT is all words after SOT.
    """
    if rule not in TOKEN_RULES:
        raise UserError(f"unknown token rule {rule!r}; expected one of {', '.join(TOKEN_RULES)}")
    if tokens.dim() != 2:
        raise ValueError(f"token ids must have shape (B, L), got {tuple(tokens.shape)}")
    batch, length = tokens.shape
    if rule == "all":
        return torch.ones(batch, length, dtype=torch.bool, device=tokens.device)
    end = first_eot(tokens, eot_token_id)[:, None]
    pos = torch.arange(length, device=tokens.device)[None, :]
    if rule == "sot-words-eot":
        return pos <= end
    return (pos >= 1) & (pos < end)


class CovarianceAccumulator:
    """Running float64 sum of e e^T over the counted token encodings, and how many there were."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0
        self.sequences = 0

    def update(self, encodings: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add the encodings (B, L, d) whose `token_mask` (B, L) is True (all of them if None)."""
        if encodings.dim() != 3 or encodings.shape[-1] != self.dim:
            raise ValueError(f"encodings must have shape (B, L, {self.dim}), got {tuple(encodings.shape)}")
        if token_mask is None:
            rows = encodings.reshape(-1, self.dim)
        else:
            if tuple(token_mask.shape) != tuple(encodings.shape[:2]):
                raise ValueError(f"token_mask shape {tuple(token_mask.shape)} does not match "
                                 f"encodings {tuple(encodings.shape[:2])}")
            rows = encodings[token_mask.to(encodings.device, torch.bool)]
        rows = rows.to(device=self.sum.device, dtype=torch.float64)
        if not torch.isfinite(rows).all():
            raise ValueError("encodings contain NaN or infinity")
        self.sum.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]
        self.sequences += encodings.shape[0]

    def finalize(self, ridge: float = 0.0) -> torch.Tensor:
        """C = sum / tokens (+ ridge * mean eigenvalue * I), float64 on the CPU, exactly symmetric.

        The ridge is relative to the mean eigenvalue tr(C)/d, so one value means the same for
        every encoder; the scale of C cancels in Perfusion's gate, its shape does not.
        """
        if self.tokens == 0:
            raise ValueError("no token encodings were accumulated")
        c = (self.sum / self.tokens).cpu()
        return add_ridge((c + c.T) / 2, ridge)[0]


def add_ridge(c: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """(C + a I, a) with a = ridge * tr(C) / d, the mean eigenvalue times the relative `ridge`."""
    if ridge < 0 or not math.isfinite(ridge):
        raise UserError(f"ridge must be a finite number >= 0, got {ridge}")
    if not ridge:
        return c, 0.0
    a = float(ridge * torch.trace(c) / c.shape[0])
    return c + a * torch.eye(c.shape[0], dtype=c.dtype, device=c.device), a


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_captions(path: str | Path, limit: int | None = None) -> Iterator[str]:
    """Non-blank lines of `path`, stripped, streamed (never the whole file in memory)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: caption file not found" + (" (it is a directory)" if path.is_dir() else ""))
    count = 0
    try:
        with _open_text(path) as f:
            for line in f:
                if limit is not None and count >= limit:
                    return
                text = line.strip()
                if text:
                    count += 1
                    yield text
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason}); save the captions as UTF-8") from err
    except (OSError, EOFError) as err:
        raise UserError(f"{path}: cannot read captions: {err}") from err


def count_captions(path: str | Path, limit: int | None = None) -> int:
    """Number of captions that `iter_captions` yields; ValueError if there are none."""
    n = sum(1 for _ in iter_captions(path, limit))
    if n == 0:
        raise UserError(f"{path}: no captions (the file is empty or has only blank lines)")
    return n


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def accumulate(encoder, captions: str | Path | Iterable[str], max_captions: int | None = None,
               token_rule: str = "all", batch_size: int = 64, progress: bool = False,
               total: int | None = None) -> tuple[CovarianceAccumulator, str]:
    """Run a text encoder over captions (a file path, streamed, or an iterable of strings).

    `encoder` follows the project's text-encoder interface (`tokenize`, `token_embedding`,
    `encode_embeddings`, `tokenizer.eot_token_id`, `output_dim`); the encodings are exactly the
    U-Net's cross-attention context. Returns the accumulator and a SHA-256 of the captions used.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if token_rule not in TOKEN_RULES:
        raise UserError(f"unknown token rule {token_rule!r}; expected one of {', '.join(TOKEN_RULES)}")
    source = str(captions) if isinstance(captions, (str, Path)) else "the caption list"
    if isinstance(captions, (str, Path)):
        captions = iter_captions(captions, max_captions)
    elif max_captions is not None:
        captions = itertools.islice(captions, max_captions)
    device = next(encoder.parameters()).device
    # float64 sums stay on CUDA; other accelerators (e.g. MPS) may lack float64, so those go to the CPU.
    acc = CovarianceAccumulator(encoder.output_dim, device=device if device.type == "cuda" else "cpu")
    digest = hashlib.sha256()
    eot = encoder.tokenizer.eot_token_id
    bar = tqdm(total=total, unit="caption", desc="encoding captions", disable=not progress)
    with bar, torch.no_grad():
        for batch in _batched(captions, batch_size):
            for text in batch:
                digest.update(text.encode("utf-8") + b"\n")
            tokens = encoder.tokenize(batch)
            encodings = encoder.encode_embeddings(tokens, encoder.token_embedding(tokens))
            acc.update(encodings, token_mask(tokens, token_rule, eot))
            bar.update(len(batch))
    if acc.sequences == 0:
        raise UserError(f"{source}: no captions (the file is empty or has only blank lines)")
    return acc, digest.hexdigest()


def estimate_covariance(encoder, captions: str | Path | Iterable[str], max_captions: int | None = None,
                        token_rule: str = "all", batch_size: int = 64, ridge: float = DEFAULT_RIDGE,
                        progress: bool = False) -> torch.Tensor:
    """C (float64, CPU) of `encoder`'s outputs over `captions`, plus the relative `ridge`.

    With the default ridge the result is always invertible by `invert` (see DEFAULT_RIDGE).
    """
    acc, _ = accumulate(encoder, captions, max_captions, token_rule, batch_size, progress)
    return acc.finalize(ridge)


def estimate_fingerprint(encoder_fingerprint: str, captions: str | Path, max_captions: int | None,
                         token_rule: str = "all") -> str:
    """The identity of an estimated C: its source (text encoder, caption file, limits), not its
    value, whose last bits change with the number of CPU threads that summed it."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"estimate|{encoder_fingerprint}|{max_captions}|{token_rule}|".encode())
    h.update(Path(captions).read_bytes())
    return h.hexdigest()


def eigen_report(c: torch.Tensor) -> dict[str, float]:
    """Smallest and largest eigenvalue of symmetric C and its condition number (inf if singular)."""
    eig = torch.linalg.eigvalsh(c.to(torch.float64))
    lo, hi = float(eig[0]), float(eig[-1])
    return {"eig_min": lo, "eig_max": hi, "condition_number": hi / lo if lo > 0 else math.inf}


def invert(c: torch.Tensor) -> torch.Tensor:
    """C^-1 in float64 via Cholesky; CovarianceError unless C is positive definite and its
    condition number is below MAX_CONDITION (beyond that, float64 leaves C^-1 meaningless)."""
    c = c.to(torch.float64)
    report = eigen_report(c)
    chol, info = torch.linalg.cholesky_ex(c)
    if int(info) != 0 or not report["condition_number"] < MAX_CONDITION:
        raise CovarianceError(f"C is singular or nearly so (smallest eigenvalue {report['eig_min']:.3g}, condition "
                              f"number {report['condition_number']:.3g}); add a ridge (e.g. --ridge 1e-6) "
                              "or use more captions")
    inv = torch.cholesky_inverse(chol)
    return ((inv + inv.T) / 2).contiguous()


def save_covariance(path: str | Path, c: torch.Tensor, metadata: Mapping[str, object],
                    c_inv: torch.Tensor | None = None) -> Path:
    """Write C (and C^-1, computed if not given) as float64 safetensors with string metadata."""
    from safetensors.torch import save_file

    c = c.detach().to("cpu", torch.float64).contiguous()
    _check_square(c, "C", str(path))
    c_inv = (invert(c) if c_inv is None else c_inv.detach()).to("cpu", torch.float64).contiguous()
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.update(format=FORMAT, version=str(VERSION), dim=str(c.shape[0]))
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({"C": c, "C_inv": c_inv}, str(tmp), metadata=meta)
    return path


def is_covariance_file(path: str | Path) -> bool:
    """Whether `path` is a file `save_covariance` wrote (its metadata says so; nothing else is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def load_covariance(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(C, C^-1, metadata) from a file written by `save_covariance`; CovarianceError names the file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such covariance file (make one with data/estimate_covariance.py)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in ("C", "C_inv") if k in keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise CovarianceError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    if meta.get("format") != FORMAT:
        raise CovarianceError(f"{path}: not a covariance file (metadata format is {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        version = -1
    if version < 1 or version > VERSION:
        raise CovarianceError(f"{path}: covariance format version {meta.get('version')!r} is not supported "
                              f"(this code reads versions 1..{VERSION})")
    if "C" not in tensors or "C_inv" not in tensors:
        raise CovarianceError(f"{path}: missing tensor(s) {sorted({'C', 'C_inv'} - set(tensors))}")
    c, c_inv = tensors["C"].to(torch.float64), tensors["C_inv"].to(torch.float64)
    _check_square(c, "C", str(path))
    if c_inv.shape != c.shape:
        raise CovarianceError(f"{path}: C_inv has shape {tuple(c_inv.shape)}, C has {tuple(c.shape)}")
    if meta.get("dim") != str(c.shape[0]):
        raise CovarianceError(f"{path}: metadata says dim {meta.get('dim')!r} but C is {c.shape[0]}x{c.shape[0]}")
    if not (torch.isfinite(c).all() and torch.isfinite(c_inv).all()):
        raise CovarianceError(f"{path}: C or C_inv contains NaN or infinity")
    if not torch.allclose(c, c.T, rtol=1e-10, atol=1e-12 * float(c.abs().max())):
        raise CovarianceError(f"{path}: C is not symmetric")
    residual = float((c @ c_inv - torch.eye(c.shape[0], dtype=torch.float64)).abs().max())
    if not residual < 1e-3:
        raise CovarianceError(f"{path}: C_inv is not the inverse of C (max |C C_inv - I| = {residual:.3g})")
    return c.to(device), c_inv.to(device), meta


def _check_square(c: torch.Tensor, name: str, where: str) -> None:
    if c.dim() != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise CovarianceError(f"{where}: {name} must be a square d x d matrix, got shape {tuple(c.shape)}")
