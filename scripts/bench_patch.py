"""ffn.patch on Hugging Face transformers models: accuracy and speed, patched vs unpatched.

For each architecture, builds a small model offline (random weights, no hub download),
patches a copy with ffn.patch, and prints per architecture: what was replaced, the max
relative difference of the float32 logits and parameter gradients against the unpatched
model, and the forward+backward time of each (median and fastest of the interleaved
repeats; on a shared machine the fastest is the steadier figure). With --kernelize, a
third copy goes through the `kernels` route instead (ffn.hub.mark_mlps, then
kernels.kernelize with ffn.hub's repository, built from the installed ffn into a
temporary directory), timed in the same interleaved rounds.

    python scripts/bench_patch.py                       # every architecture, CPU
    python scripts/bench_patch.py --arch llama --kernelize --threads 1
    python scripts/bench_patch.py --arch llama,gemma --hidden 512 --seq 256 --device cuda
    python scripts/bench_patch.py --json results.json
"""

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import ffn

VOCAB = 1024


def configs(hidden, layers):
    """architecture -> (config factory, model class name). Widths follow each family's ratios."""
    import transformers as T

    heads = max(1, hidden // 64)
    kv = max(1, heads // 2)
    gated_ff = max(64, hidden * 8 // 3 // 64 * 64)  # Llama's 8/3 * hidden, in multiples of 64
    decoder = dict(hidden_size=hidden, intermediate_size=gated_ff, num_hidden_layers=layers, vocab_size=VOCAB)
    attn = dict(num_attention_heads=heads, num_key_value_heads=kv)
    special = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    t5 = dict(d_model=hidden, d_ff=hidden * 4, d_kv=64, num_layers=layers, num_heads=heads, vocab_size=VOCAB,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return {
        "llama": (lambda: T.LlamaConfig(**decoder, **attn), "LlamaForCausalLM"),
        "mistral": (lambda: T.MistralConfig(**decoder, **attn), "MistralForCausalLM"),
        "qwen2": (lambda: T.Qwen2Config(**decoder, **attn), "Qwen2ForCausalLM"),
        "qwen3": (lambda: T.Qwen3Config(**decoder, **attn, head_dim=64), "Qwen3ForCausalLM"),
        "phi3": (lambda: T.Phi3Config(**decoder, **attn, **special), "Phi3ForCausalLM"),
        "gemma": (lambda: T.GemmaConfig(**decoder, **attn, head_dim=64), "GemmaForCausalLM"),
        "gemma2": (lambda: T.Gemma2Config(**decoder, **attn, head_dim=64), "Gemma2ForCausalLM"),
        "gpt2": (lambda: T.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                                      vocab_size=VOCAB, bos_token_id=1, eos_token_id=1), "GPT2LMHeadModel"),
        "gpt_neox": (lambda: T.GPTNeoXConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                             num_hidden_layers=layers, num_attention_heads=heads, vocab_size=VOCAB,
                                             eos_token_id=1, bos_token_id=1), "GPTNeoXForCausalLM"),
        "olmo": (lambda: T.OlmoConfig(**decoder, **attn, pad_token_id=0, eos_token_id=1), "OlmoForCausalLM"),
        "olmo2": (lambda: T.Olmo2Config(**decoder, **attn, pad_token_id=0, eos_token_id=1), "Olmo2ForCausalLM"),
        "falcon": (lambda: T.FalconConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          vocab_size=VOCAB, eos_token_id=1, bos_token_id=1), "FalconForCausalLM"),
        "t5_v1_0": (lambda: T.T5Config(**t5, feed_forward_proj="relu"), "T5ForConditionalGeneration"),
        "t5_v1_1": (lambda: T.T5Config(**t5, feed_forward_proj="gated-gelu"), "T5ForConditionalGeneration"),
    }


def build(factory, cls_name, device):
    import transformers as T

    torch.manual_seed(0)
    model = getattr(T, cls_name)(factory()).to(device).eval()
    with torch.no_grad():  # norm weights away from their ones/zeros init
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(arch, batch, seq, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)} if arch.startswith("t5") else {"input_ids": ids}


def fwd_bwd(model, batch_inputs, weights):
    model.zero_grad(set_to_none=True)
    logits = model(**batch_inputs).logits
    (logits.float() * weights).sum().backward()
    return logits.detach()


def rel_diff(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def timed(fn, device):
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def kernelized_copy(model, hub_repo, device):
    """A copy of model through kernels.kernelize with ffn's layers; (copy, {layer name: count})."""
    from collections import Counter

    from kernels import Mode, get_kernelized_layers, kernelize, use_kernel_mapping

    twin = copy.deepcopy(model)
    ffn.hub.mark_mlps(twin)
    with use_kernel_mapping(ffn.hub.kernel_mapping(hub_repo), inherit_mapping=False):
        kernelize(twin, mode=Mode.TRAINING, device=device)
    return twin, dict(Counter(k.repo.layer_name for k in get_kernelized_layers(twin).layers.values()))


def measure(arch, factory, cls_name, args):
    ref = build(factory, cls_name, args.device)
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ffn.patch(ours)
    models = {"unpatched": ref, "patched": ours}
    kernelized = {}
    if args.hub_repo:
        models["kernelized"], kernelized = kernelized_copy(ref, args.hub_repo, args.device)
    batch_inputs = inputs(arch, args.batch, args.seq, args.device)
    logits = ref(**batch_inputs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(args.device)
    logits_ref, logits_ours = fwd_bwd(ref, batch_inputs, weights), fwd_bwd(ours, batch_inputs, weights)
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    grads_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads_ref.keys() == grads_ours.keys()
    scale = max(g.abs().max().item() for g in grads_ref.values())
    grad_diff = max((grads_ref[n] - grads_ours[n]).abs().max().item() for n in grads_ref) / scale
    for _ in range(args.warmup):
        for model in models.values():
            fwd_bwd(model, batch_inputs, weights)
    # Interleaved, so drift in the machine's speed hits all alike.
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(timed(lambda: fwd_bwd(model, batch_inputs, weights), args.device))
    row = {"arch": arch, "replaced": dict(report), "logits_rel_diff": rel_diff(logits_ours, logits_ref),
           "grad_rel_diff": grad_diff}
    for name, t in times.items():
        row[f"{name}_ms"], row[f"{name}_min_ms"] = 1e3 * statistics.median(t), 1e3 * min(t)
    if args.hub_repo:
        logits_k = fwd_bwd(models["kernelized"], batch_inputs, weights)
        row.update(kernelized=kernelized, kernelized_logits_rel_diff=rel_diff(logits_k, logits_ref))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="comma-separated architectures (default: all)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--kernelize", action="store_true",
                        help="also time a copy kernelized with ffn.hub's layers (needs the kernels package)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = configs(args.hidden, args.layers)
    archs = args.arch.split(",") if args.arch else list(table)
    unknown = set(archs) - set(table)
    if unknown:
        parser.error(f"unknown architectures {sorted(unknown)}; known: {', '.join(table)}")
    if not args.kernelize:
        args.hub_repo = None
        report(args, table, archs)
        return
    import tempfile

    import ffn.hub

    # The repository lives as long as this run; the kernelized models import from it.
    with tempfile.TemporaryDirectory(prefix="ffn-hub-") as tmp:
        args.hub_repo = Path(tmp) / "ffn"
        ffn.hub.build_repository(args.hub_repo)
        report(args, table, archs)


def report(args, table, archs):
    """The table (and --json) for `archs`, measured on args.device."""
    import transformers

    print(f"# ffn.patch, float32 {args.device}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads; hidden {args.hidden}, {args.layers} layers, batch {args.batch} x "
          f"seq {args.seq}; forward+backward ms, median / fastest of {args.repeats}")
    extra = " kernelized (layers) | kernelized ms | speedup (fastest) |" if args.hub_repo else ""
    print("| arch | replaced | logits max rel diff | grad max rel diff | unpatched ms | patched ms | "
          f"speedup (fastest) |{extra}")
    print("|---|---|---|---|---|---|---|" + "---|---|---|" * bool(args.hub_repo))
    rows = []
    for arch in archs:
        row = measure(arch, *table[arch], args)
        rows.append(row)
        replaced = ", ".join(f"{k} {v}" for k, v in row["replaced"].items())
        print(f"| {arch} | {replaced} | {row['logits_rel_diff']:.1e} | {row['grad_rel_diff']:.1e} | "
              f"{row['unpatched_ms']:.1f} / {row['unpatched_min_ms']:.1f} | "
              f"{row['patched_ms']:.1f} / {row['patched_min_ms']:.1f} | "
              f"{row['unpatched_min_ms'] / row['patched_min_ms']:.2f}x |" + (
                  f" {', '.join(f'{k} {v}' for k, v in row['kernelized'].items()) or 'none'} | "
                  f"{row['kernelized_ms']:.1f} / {row['kernelized_min_ms']:.1f} | "
                  f"{row['unpatched_min_ms'] / row['kernelized_min_ms']:.2f}x |" if args.hub_repo else ""),
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "transformers": transformers.__version__,
                       "args": vars(args), "rows": rows}, f, indent=2, default=str)


if __name__ == "__main__":
    main()
