"""The CLIP tokenizer files (`vocab.json`, `merges.txt`) rebuilt from open_clip's BPE file.

CLIPSeg uses the original CLIP vocabulary, which open_clip ships as
`bpe_simple_vocab_16e6.txt.gz`. The Hugging Face files hold the same data: the 256 byte
symbols, the same with the end-of-word marker `</w>`, one entry per merge, then the start and
end tokens (49408 entries), and the merge list. A CLIPSeg download without tokenizer files can
be completed with `python -m clipseg.tokenizer_files DIR`; `load_clipseg` also builds the
tokenizer in memory when the files are missing.
"""
from __future__ import annotations

import argparse
import gzip
import json
from functools import lru_cache
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe

from ldm.errors import NotAFolderError, UserError
from ldm.util import atomic_path

VOCAB_SIZE = 49408
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merges fill the vocabulary between bytes and specials


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merges as "a b" strings) of the CLIP BPE tokenizer."""
    lines = gzip.open(default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = tuple(lines[1 : 1 + _N_MERGES])  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [SOT, EOT]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise UserError(f"{default_bpe()}: expected {VOCAB_SIZE} distinct CLIP tokens, built {len(vocab)}")
    return vocab, merges


def write_tokenizer_files(directory: str | Path) -> list[Path]:
    """Write `vocab.json` and `merges.txt` into `directory`; returns the two paths."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotAFolderError(f"{directory}: not a directory")
    vocab, merges = clip_vocabulary()
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    with atomic_path(vocab_path) as tmp:
        tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with atomic_path(merges_path) as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return [vocab_path, merges_path]


def build_tokenizer():
    """A `transformers.CLIPTokenizer` with the CLIP vocabulary, built without any file download."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write CLIP's vocab.json and merges.txt into a model folder.")
    parser.add_argument("directory", help="folder of a Hugging Face CLIP/CLIPSeg model")
    args = parser.parse_args(argv)
    for path in write_tokenizer_files(args.directory):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from ldm.cli import run_cli

    run_cli(main)
