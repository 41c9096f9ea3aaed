"""Builders shared by the harness tests: tiny models, batches, corpora, run arguments."""

import json

import torch

from ffn.harness.model import ModelConfig, TransformerLM

TINY = dict(vocab_size=256, seq_len=16, d_model=16, n_layers=2, n_heads=2, d_ff=32)
SUMMARY_KEYS = {"input_mean", "input_mean_abs", "down_in_mean", "gate_preact_mean", "gate_preact_std",
                "gate_near_zero_frac", "gate_large_frac", "h_max_over_rms", "h_kurtosis", "h_outlier_frac"}


def tiny_model(design, backend="ffn", seed=0, **sizes):
    torch.manual_seed(seed)
    return TransformerLM(ModelConfig(**{**TINY, **sizes}, design=design, backend=backend))


def tiny_batch(seed=1, batch=3, seq_len=TINY["seq_len"]):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, seq_len), generator=g)
    return x, torch.roll(x, -1, dims=1)


def train_losses(model, steps=3, with_telemetry=False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    x, y = tiny_batch()
    for _ in range(steps):
        stats = [] if with_telemetry else None
        _, loss = model(x, y, stats=stats)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def write_corpus(path):
    words = ("the king and queen of england speak to their lords in the castle while a storm "
             "rises over the sea and the fool sings of love and death").split()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (6000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx))
    return path


def run_args(tmp_path, name, *extra):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        write_corpus(corpus)
    return ["--preset", "tiny", "--data", str(corpus), "--out", str(tmp_path / "runs"), "--name", name,
            "--no-progress", *extra]


def read_metrics(tmp_path, name, kind="train"):
    lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
