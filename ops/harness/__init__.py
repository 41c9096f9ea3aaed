"""The A/B harness: trains small Transformers whose norm + FFN sublayer is chosen by
flags, on the same data, seed and budget, and reports what a mean shift does to
each design (per-layer telemetry, shift and quantization probes).

Run it as `python -m ffn.harness` (or `scripts/ab.py`, `make ab`); `--help` lists
the flags. The op library (`import ffn`) never imports this package.

    config.py       TrainConfig, RunConfig, presets
    designs.py      Design and the design vocabulary and grammar (--designs)
    model.py        the Transformer LM built from a Design
    data.py         the bundled corpus, byte tokens, batches
    distributed.py  one process, or ranks under torchrun: the process group and device mesh (--parallel)
    parallel.py     FSDP2 and tensor parallelism of the model, the gathered replica for evaluation
    checkpoint.py   checkpoints (torch.distributed.checkpoint) that load into any mode and world size
    train.py        the training loop, --resume
    evaluate.py     validation loss and telemetry, the post-training probes
    probes.py       where a mean shift arrives (shift offsets)
    quant.py        int8 / int4 weight-only, int8 down-proj input, W8A8 (per tensor, per channel, SmoothQuant)
    outliers.py     outlier statistics: neuron-rms kurtosis, max/median, gate/up alignment, W8A8 error
    health.py       divergence / spike / did-not-learn flags, gradient norms, update ratios
    stats.py        95% t intervals over seeds and paired differences (SciPy)
    studies.py      seed tables, paired differences and the case-study answers of the report
    metrics.py      metrics.jsonl + TensorBoard, telemetry overhead, memory
    results.py      DesignResult, RunMeta (result.json, run.json)
    report.py       the terminal table, report.md and plots
    cli.py          the command line
"""
