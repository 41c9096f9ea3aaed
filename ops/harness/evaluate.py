"""Evaluation of a trained design: validation loss and telemetry over fixed windows,
and the post-training probes (mean shift, quantized FFN weights, quantized
down-projection input)."""

from dataclasses import dataclass

import torch

from .. import telemetry
from . import data as textdata
from .model import shift_probe, var_shift_probe
from .outliers import captured_outliers, eval_outliers
from .probes import ShiftRecorder
from .quant import W8A8_MODES, calibrate, quantized_down_input, quantized_ffn_weights, quantized_w8a8
from .results import ShiftProbe

QUANT_BITS = (8, 4)  # weight-only probes; the down-projection input probe is int8
# W8A8 static activation scales are calibrated on this many training batches (a fixed
# stream, the same for every design and seed); outlier statistics read this many
# validation batches.
CALIB_BATCHES = 4
CALIB_SEED = 999_983
OUTLIER_BATCHES = 4


def eval_batches(tokens, config, env):
    """The fixed validation windows of this rank (they are sharded over ranks), in batches."""
    offsets = textdata.eval_offsets(len(tokens), config.seq_len, config.eval_windows)[env.rank::env.world]
    for start in range(0, len(offsets), config.batch_size):
        yield textdata.get_batch(tokens, offsets[start:start + config.batch_size], config.seq_len, env.device)


def layer_summaries(stats, env):
    """Per-layer telemetry summaries of raw sums [layers, fields], combined over ranks."""
    if env.world > 1:
        telemetry.all_reduce_(stats)
    return [telemetry.summarize(layer) for layer in stats]


@torch.no_grad()
def evaluate(model, tokens, config, env, with_stats=False, on_batch=None):
    """(mean validation loss over the fixed windows, the per-layer telemetry summaries over
    the same windows when asked, else None). `on_batch()`, when given, is called after each
    batch's forward (probes.ShiftRecorder reads what that forward captured)."""
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of losses, windows)
    layer_stats = None
    for x, y in eval_batches(tokens, config, env):
        stats = [] if with_stats else None
        with env.autocast(config.amp):
            _, loss = model(x, y, stats=stats)
        if on_batch is not None:
            on_batch()
        loss_sum += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64, device=env.device)
        if with_stats:
            batch = torch.stack(stats)
            layer_stats = batch if layer_stats is None else telemetry.combine([layer_stats, batch])
    env.all_reduce_(loss_sum)
    val_loss = float(loss_sum[0] / loss_sum[1])
    if not with_stats:
        return val_loss, None
    if layer_stats is None:  # this rank had no window
        layer_stats = telemetry.neutral(len(model.blocks), device=env.device)
    return val_loss, layer_summaries(layer_stats, env)


@dataclass
class Evaluation:
    val_loss: float
    telemetry_val: list | None
    shift_probe: ShiftProbe | None
    quantized_val_loss: dict  # probe name (int8, int4, int8_h) -> validation loss
    w8a8_val_loss: dict | None = None  # W8A8 mode -> validation loss
    outliers_val: list | None = None
    vshift_probe: dict | None = None


def calibration_batches(train_tokens, config, env):
    for i in range(CALIB_BATCHES):
        offsets = textdata.batch_offsets(len(train_tokens), config.seq_len, config.batch_size, CALIB_SEED, i)
        yield textdata.get_batch(train_tokens, offsets, config.seq_len, env.device)[0]


def evaluate_design(model, corpus, config, env, probe_shift):
    """The end-of-training evaluation and probes of one model on the validation tokens
    (`corpus` a TextData; its training tokens calibrate the W8A8 probes)."""
    tokens = corpus.val
    with_tel = config.telemetry_every > 0
    reduce = env.all_reduce_ if env.world > 1 else None
    probe = None
    if probe_shift:
        # The shift probe reads the forwards of the plain and the shifted evaluation (the same
        # windows): the norm input rms and the base FFN tensors from the first, the shifted
        # ones from the second, instead of running the model again for them.
        # The outlier statistics read the first OUTLIER_BATCHES of that first forward as well.
        recorder = ShiftRecorder(model)
        ffn_in, resid = [[] for _ in recorder.blocks], [[] for _ in recorder.blocks]

        def base_batch():
            if len(ffn_in[0]) < OUTLIER_BATCHES:
                for i, c in enumerate(recorder.caps):
                    ffn_in[i].append(c["ffn_in"].reshape(-1, c["ffn_in"].shape[-1]))
                    resid[i].append(c["resid"].reshape(-1, c["resid"].shape[-1]))
            recorder.batch()

        with recorder.recording("base"):
            val_loss, tel_val = evaluate(model, tokens, config, env, with_stats=with_tel, on_batch=base_batch)
        outliers = captured_outliers(model, ffn_in, resid)
        del ffn_in, resid
        rms = recorder.rms(all_reduce=reduce)
        shifts = [probe_shift * r for r in rms]
        with shift_probe(model, shifts), recorder.recording("shifted"):
            shifted_loss, tel_shifted = evaluate(model, tokens, config, env, with_stats=with_tel,
                                                 on_batch=recorder.batch)
        probe = ShiftProbe(shift_rms_units=probe_shift, norm_input_rms=rms, shifts=shifts, val_loss=shifted_loss,
                           telemetry=tel_shifted, offsets=recorder.offsets(all_reduce=reduce))
        # The same mean shift, its size varying per sequence (x m, model.sequence_multipliers).
        with var_shift_probe(model, shifts):
            v_loss, v_tel = evaluate(model, tokens, config, env, with_stats=with_tel)
        vprobe = {"shift_rms_units": probe_shift, "shifts": shifts, "val_loss": v_loss, "telemetry": v_tel}
    else:
        val_loss, tel_val = evaluate(model, tokens, config, env, with_stats=with_tel)
        vprobe = None
        outliers = eval_outliers(model, (x for i, (x, _) in enumerate(eval_batches(tokens, config, env))
                                         if i < OUTLIER_BATCHES))
    quantized = {}
    for bits in QUANT_BITS:
        with quantized_ffn_weights(model, bits):
            quantized[f"int{bits}"], _ = evaluate(model, tokens, config, env)
    with quantized_down_input(model, 8):
        quantized["int8_h"], _ = evaluate(model, tokens, config, env)
    calib = calibrate(model, calibration_batches(corpus.train, config, env))
    w8a8 = {}
    for mode in W8A8_MODES:
        with quantized_w8a8(model, calib, mode):
            w8a8[mode], _ = evaluate(model, tokens, config, env)
    return Evaluation(val_loss, tel_val, probe, quantized, w8a8, outliers, vprobe)
