"""The A/B harness: trains small Transformers whose norm + FFN sublayer is chosen by
flags, on the same data, seed and budget, and reports what a mean shift does to
each design (per-layer telemetry, shift and quantization probes).

Run it as `python -m ffn.harness` (or `scripts/ab.py`, `make ab`); `--help` lists
the flags. The op library (`import ffn`) never imports this package.

    config.py       TrainConfig, RunConfig, presets
    designs.py      Design and the design vocabulary and grammar (--designs)
    model.py        the Transformer LM built from a Design
    data.py         the bundled corpus, byte tokens, batches
    processes.py    one process, or ranks under torchrun: the process group and device mesh (--parallel)
    parallel.py     FSDP2 and tensor parallelism of the model, the gathered replica for evaluation
    checkpoint.py   checkpoints (torch.distributed.checkpoint) that load into any mode and world size,
                    with sha256 of every file, verified before a resume loads anything
    train.py        the training loop of one design in pieces (build, restore, batches, telemetry, finish), --resume
    evaluate.py     validation loss and telemetry, the post-training probes
    probes.py       where a mean shift arrives (shift offsets)
    quant.py        int8 / int4 weight-only, int8 down-proj input, W8A8 (per tensor, per channel, SmoothQuant)
    outliers.py     outlier statistics: neuron-rms kurtosis, max/median, gate/up alignment, W8A8 error
    health.py       divergence / spike / did-not-learn flags (and the marks of such runs), gradient norms,
                    update ratios
    stats.py        95% t intervals over seeds and paired differences (SciPy)
    studies.py      seed tables, paired differences and the case-study answers of the report
    metrics.py      metrics.jsonl (a torn last line dropped, a failed append undone) + TensorBoard,
                    telemetry overhead, memory
    results.py      DesignResult, RunMeta (result.json, run.json)
    files.py        atomic writes that name their file, checksums, the run directory's lock
    tables.py       the one markdown table and number check of the report, studies and benchmark scripts
    report/         the terminal table, report.md (tables, findings, plots), python -m ffn.harness.report
    cli.py          the command line: flags validated, the run directory locked, finished members checked
"""
