"""ffn.patch on Hugging Face transformers models: tiny configs built offline, each
patched copy against its unpatched twin (logits and gradients in float32, bfloat16
and CPU autocast; state_dict round trips; generate; torch.compile; telemetry;
the errors for what patch() does not know)."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ffn

T = pytest.importorskip("transformers")
P = ffn.patching

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

VOCAB, BATCH, SEQ = 97, 2, 8
ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB)
T5_TOKENS = dict(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

# name -> (config factory, model class, what patch() replaces)
ARCHS = {
    "llama": (lambda: T.LlamaConfig(**DECODER, **ATTN), "LlamaForCausalLM", {"LlamaRMSNorm": 5, "LlamaMLP": 2}),
    "mistral": (lambda: T.MistralConfig(**DECODER, **ATTN), "MistralForCausalLM",
                {"MistralRMSNorm": 5, "MistralMLP": 2}),
    "qwen2": (lambda: T.Qwen2Config(**DECODER, **ATTN), "Qwen2ForCausalLM", {"Qwen2RMSNorm": 5, "Qwen2MLP": 2}),
    "qwen3": (lambda: T.Qwen3Config(**DECODER, **ATTN, head_dim=8), "Qwen3ForCausalLM",
              {"Qwen3RMSNorm": 9, "Qwen3MLP": 2}),  # q_norm and k_norm in every layer
    "phi3": (lambda: T.Phi3Config(**DECODER, **ATTN, pad_token_id=0, eos_token_id=1, bos_token_id=1),
             "Phi3ForCausalLM", {"Phi3RMSNorm": 5, "Phi3MLP": 2}),
    "gpt2": (lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                                  bos_token_id=1, eos_token_id=1),
             "GPT2LMHeadModel", {"LayerNorm": 5, "GPT2MLP": 2}),
    "gpt_neox": (lambda: T.GPTNeoXConfig(**DECODER, num_attention_heads=4, eos_token_id=1, bos_token_id=1),
                 "GPTNeoXForCausalLM", {"LayerNorm": 5, "GPTNeoXMLP": 2}),
    "olmo": (lambda: T.OlmoConfig(**DECODER, **ATTN, pad_token_id=0, eos_token_id=1),
             "OlmoForCausalLM", {"OlmoLayerNorm": 5, "OlmoMLP": 2}),
    "olmo2": (lambda: T.Olmo2Config(**DECODER, **ATTN, pad_token_id=0, eos_token_id=1),
              "Olmo2ForCausalLM", {"Olmo2RMSNorm": 9, "Olmo2MLP": 2}),
    "gemma": (lambda: T.GemmaConfig(**DECODER, **ATTN, head_dim=8), "GemmaForCausalLM",
              {"GemmaRMSNorm": 5, "GemmaMLP": 2}),
    "gemma2": (lambda: T.Gemma2Config(**DECODER, **ATTN, head_dim=8), "Gemma2ForCausalLM",
               {"Gemma2RMSNorm": 9, "Gemma2MLP": 2}),
    "falcon": (lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                      eos_token_id=1, bos_token_id=1),
               "FalconForCausalLM", {"LayerNorm": 3, "FalconMLP": 2}),
    # T5 v1.0: a plain ReLU FFN (relu_ffn); v1.1: GeGLU with the tanh GELU (geglu, approximate="tanh").
    "t5_v1_0": (lambda: T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=VOCAB,
                                   feed_forward_proj="relu", **T5_TOKENS),
                "T5ForConditionalGeneration", {"T5LayerNorm": 12, "T5DenseActDense": 4}),
    "t5_v1_1": (lambda: T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, vocab_size=VOCAB,
                                   feed_forward_proj="gated-gelu", **T5_TOKENS),
                "T5ForConditionalGeneration", {"T5LayerNorm": 12, "T5DenseGatedActDense": 4}),
}
ENC_DEC = {"t5_v1_0", "t5_v1_1"}


def build(arch, seed=0, archs=ARCHS):
    """The unpatched model, in eval mode, with norm weights away from their ones/zeros init
    (`archs`: the table of tiny configs, as ARCHS; test_hub.py has its own)."""
    make_config, cls_name, _ = archs[arch]
    torch.manual_seed(seed)
    model = getattr(T, cls_name)(make_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def patched_copy(model):
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ffn.patch(twin)
    return twin


def inputs(arch, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)} if arch in ENC_DEC else {"input_ids": ids}


def loss_of(logits):
    """A scalar whose gradient reaches every logit with a different weight."""
    g = torch.Generator().manual_seed(2)
    return (logits.float() * torch.randn(logits.shape, generator=g)).sum()


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def max_grad_diff(ref, ours):
    """(max |difference|, max |reference|) over all parameter gradients."""
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ref.keys() == g_ours.keys() and g_ref
    diff = max((g_ref[n].float() - g_ours[n].float()).abs().max().item() for n in g_ref)
    scale = max(g.float().abs().max().item() for g in g_ref.values())
    return diff, scale


def fwd_bwd(model, arch, **kw):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs(arch), **kw).logits
    loss_of(logits).backward()
    return logits.detach()


# ----------------------------------------------------------------------------- what is patched
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_reports_what_it_replaced(arch):
    model = build(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ffn.patch(model)
    assert dict(report) == ARCHS[arch][2]
    assert report.skipped == {} and not any("ffn.patch" in str(w.message) for w in caught)
    assert ffn.patch(model) == {}  # a second call has nothing left to replace
    # Patched modules keep their classes' identity (isinstance) and implement ffn's FFN interface.
    for m in model.modules():
        if isinstance(m, P._Patched):
            assert isinstance(m, type(m)._ffn_original_class)
            assert isinstance(m, ffn.FFN) == ("MLP" in type(m).__name__ or "Dense" in type(m).__name__)
            if isinstance(m, ffn.FFN):  # every MLP of these architectures runs on a fused op
                gated = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu"}
                fused = gated[m.activation] if m.gated else "relu_ffn" if m.activation == "relu" else "gelu_ffn"
                assert m._ffn_fused_op == fused


# ----------------------------------------------------------------------------- float32: logits and gradients
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_gradients_match_fp32(arch):
    ref = build(arch)
    ours = patched_copy(ref)
    logits_ref, logits_ours = fwd_bwd(ref, arch), fwd_bwd(ours, arch)
    torch.testing.assert_close(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)
    diff, scale = max_grad_diff(ref, ours)
    assert diff <= 2e-5 * scale, (diff, scale)


def test_falcon_logits_match_without_autograd():
    # Without autograd the in-place add on the op's output is fine: inference works today.
    ref = build("falcon")
    ours = patched_copy(ref)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs("falcon")).logits, ref(**inputs("falcon")).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5_v1_1", "gpt2"])
def test_dropout_in_training_mode_draws_the_same_masks(arch):
    # T5's dropout sits between the gate and the down projection (the split path);
    # GPT-2's after c_proj. Same seed, same order of draws: the same outputs.
    ref = build(arch).train()
    ours = patched_copy(ref).train()
    torch.manual_seed(5)
    logits_ref = fwd_bwd(ref, arch)
    torch.manual_seed(5)
    logits_ours = fwd_bwd(ours, arch)
    torch.testing.assert_close(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)
    diff, scale = max_grad_diff(ref, ours)
    assert diff <= 2e-5 * scale


# ----------------------------------------------------------------------------- bfloat16 and autocast
def _bf16_error_bound(ref32, ref16, ours16):
    """ours16's error against the float32 logits is at most about HF's own bfloat16 error."""
    err_hf = (ref16.float() - ref32).abs().max().item()
    err_ours = (ours16.float() - ref32).abs().max().item()
    scale = ref32.abs().max().item()
    assert err_ours <= 2 * err_hf + 1e-2 * scale, (err_ours, err_hf, scale)
    torch.testing.assert_close(ours16.float(), ref16.float(), rtol=0, atol=3e-2 * scale)


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_logits(arch):
    ref = build(arch)
    with torch.no_grad():
        ref32 = ref(**inputs(arch)).logits
        ref16 = ref.to(torch.bfloat16)
        ours16 = patched_copy(ref16)
        assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
        _bf16_error_bound(ref32, ref16(**inputs(arch)).logits, ours16(**inputs(arch)).logits)


def _rel_grad_error(ref, ours):
    g_ref, g_ours = grads(ref), grads(ours)
    num = sum((g_ref[n].float() - g_ours[n].float()).square().sum() for n in g_ref)
    den = sum(g.float().square().sum() for g in g_ref.values())
    return (num / den).sqrt().item()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3", "gpt2", "gemma2", "olmo2", "t5_v1_1"])
def test_bfloat16_gradients(arch):
    ref = build(arch).to(torch.bfloat16)
    ours = patched_copy(ref)
    fwd_bwd(ref, arch), fwd_bwd(ours, arch)
    assert all(g.dtype == torch.bfloat16 for g in grads(ours).values())
    assert _rel_grad_error(ref, ours) < 3e-2


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gpt_neox", "gemma", "olmo", "t5_v1_1"])
def test_cpu_autocast_logits_and_gradients(arch):
    ref = build(arch)
    ours = patched_copy(ref)
    with torch.no_grad():
        ref32 = ref(**inputs(arch)).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_ref, logits_ours = fwd_bwd(ref, arch), fwd_bwd(ours, arch)
    assert logits_ours.dtype == logits_ref.dtype
    _bf16_error_bound(ref32, logits_ref, logits_ours)
    assert all(g.dtype == torch.float32 for g in grads(ours).values())
    assert _rel_grad_error(ref, ours) < 3e-2


# ----------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_round_trip(arch):
    ref = build(arch)
    ours = patched_copy(ref)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours) == list(sd_ref)
    assert all(torch.equal(sd_ours[k], sd_ref[k]) for k in sd_ref)
    # An HF checkpoint loads into a patched model unchanged (strict), and back.
    fresh = patched_copy(build(arch, seed=3))
    fresh.load_state_dict(sd_ref)
    unpatched = build(arch, seed=4)
    unpatched.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        want = ref(**inputs(arch)).logits
        torch.testing.assert_close(fresh(**inputs(arch)).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unpatched(**inputs(arch)).logits, want, rtol=0, atol=0)
    assert_no_shared_storage(fresh)


def assert_no_shared_storage(model):
    """Distinct parameters (the declared tied weights aside) have distinct storage."""
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        ptr = p.untyped_storage().data_ptr()
        assert ptr not in seen, f"{name} shares storage with {seen[ptr]}"
        seen[ptr] = name


def test_parameters_are_the_hf_ones_in_their_own_storage_across_to():
    ref = build("llama")
    params = dict(ref.named_parameters())
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    ffn.patch(ref)
    assert {n: id(p) for n, p in ref.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert {n: p.data_ptr() for n, p in ref.named_parameters()} == ptrs  # patch() moves no weight
    ref.to(torch.bfloat16)
    assert_no_shared_storage(ref)
    ref.float()
    assert_no_shared_storage(ref)


def test_unpatch_restores_the_classes():
    ref = build("gemma")
    ours = patched_copy(ref)
    assert ffn.unpatch(ours) == {"GemmaRMSNorm": 5, "GemmaMLP": 2}
    assert {type(m) for m in ours.modules()} == {type(m) for m in ref.modules()}
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs("gemma")).logits, ref(**inputs("gemma")).logits)


# ----------------------------------------------------------------------------- generate and compile
@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5_v1_1"])
def test_generate_greedy_tokens_match(arch):
    ref = build(arch)
    ours = patched_copy(ref)
    ids = inputs(arch)["input_ids"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward_llama():
    # aot_eager: Dynamo captures the whole model in one graph and AOTAutograd traces
    # the ffn ops' fake kernels and backward (inductor adds only code generation;
    # the next test runs it).
    torch._dynamo.reset()
    ref = build("llama")
    ours = patched_copy(ref)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    logits_ref, logits_ours = fwd_bwd(ref, "llama"), fwd_bwd(compiled, "llama")
    torch.testing.assert_close(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)
    diff, scale = max_grad_diff(ref, ours)
    assert diff <= 2e-5 * scale


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_compile_every_architecture(arch):
    """Every patched architecture under torch.compile (aot_eager: Dynamo and AOTAutograd trace
    the ffn ops' fake kernels and backward): the unpatched model's logits and gradients, and no
    graph break is caused by ffn (HF's own code may break graphs in some models)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ref = build(arch)
    ours = patched_copy(ref)
    compiled = torch.compile(ours, backend="aot_eager")
    logits_ref, logits_ours = fwd_bwd(ref, arch), fwd_bwd(compiled, arch)
    breaks = [reason for reason in torch._dynamo.utils.counters["graph_break"] if "ffn" in reason]
    assert not breaks, breaks
    torch.testing.assert_close(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)
    diff, scale = max_grad_diff(ref, ours)
    assert diff <= 2e-5 * scale, (diff, scale)


@pytest.mark.slow
def test_compile_inductor_gpt2():
    torch._dynamo.reset()
    ref = build("gpt2")
    ours = patched_copy(ref)
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs("gpt2")).logits, ref(**inputs("gpt2")).logits,
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- telemetry
def float32_sum_tolerance(want):
    """Per-field bound on ffn_stats' error against the float64 reference: the kernels sum in float32,
    so an error of about 1e-6 of the sum of |terms| (what rounding leaves of a sum of a few thousand
    float32 terms). For the signed sums, which cancel, |terms| comes from the reference's even sums:
    |h| <= (1 + h^2) / 2 and |h|^3 <= (h^2 + h^4) / 2 elementwise; row means have their abs sum."""
    f = dict(zip(ffn.telemetry.STAT_FIELDS, want))
    magnitude = want.abs().clone()
    bounds = {"input_row_mean_sum": f["input_row_mean_abs_sum"],
              "h_sum": (f["h_count"] + f["h_sq_sum"]) / 2,
              "h_cube_sum": (f["h_sq_sum"] + f["h_quad_sum"]) / 2,
              "gate_sum": (f["gate_count"] + f["gate_sq_sum"]) / 2}
    for name, bound in bounds.items():
        magnitude[ffn.telemetry.STAT_FIELDS.index(name)] = bound
    return 1e-6 * magnitude + 1e-6


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gemma", "t5_v1_1"])
def test_telemetry_table_matches_reference_stats(arch):
    model = patched_copy(build(arch))
    captured = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: captured.setdefault(name, []).append(args[0]))
             for name, m in model.named_modules() if isinstance(m, P._FFNPatched)]
    with torch.no_grad():
        plain = model(**inputs(arch)).logits
        captured.clear()
        with ffn.telemetry.record(model) as rec:
            logits = model(**inputs(arch)).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits, plain, rtol=0, atol=0)  # recording changes nothing
    table = rec.table()
    mlps = [name for name, m in model.named_modules() if isinstance(m, P._FFNPatched)]
    assert [row["module"] for row in table] == mlps
    stats = rec.stats()
    for row in table:
        m = model.get_submodule(row["module"])
        assert set(ffn.telemetry.summarize(stats[row["module"]])) <= set(row)
        assert row["activation"] == m.activation and row["gated"] == m.gated and row["layer"] is not None
        want = []
        for x in captured[row["module"]]:
            w_in, b_in = m.in_proj()
            preact = F.linear(x, w_in, b_in).reshape(-1, w_in.shape[0])
            want.append(ffn.telemetry.reference_stats(x, preact, m.activation, m.gated))
        want = ffn.telemetry.combine(want)
        err = (stats[row["module"]] - want).abs()
        tol = float32_sum_tolerance(want)
        assert (err <= tol).all(), f"{row['module']}: |ffn_stats - reference| {err.tolist()} over {tol.tolist()}"
    assert not hasattr(model.get_submodule(mlps[0]), "_ffn_telemetry") or \
        model.get_submodule(mlps[0])._ffn_telemetry is None  # detached on exit


def test_telemetry_with_gradients_and_collect():
    ref = build("llama")
    ours = patched_copy(ref)
    with ffn.telemetry.record(ours) as rec:
        logits_ours = fwd_bwd(ours, "llama")
    logits_ref = fwd_bwd(ref, "llama")
    torch.testing.assert_close(logits_ours, logits_ref, rtol=1e-5, atol=1e-5)
    diff, scale = max_grad_diff(ref, ours)
    assert diff <= 2e-5 * scale
    assert [row["calls"] for row in rec.table()] == [1, 1]
    ours.train()
    table = ffn.telemetry.collect(ours, [inputs("llama")["input_ids"], inputs("llama", seed=9)])
    assert ours.training and [row["layer"] for row in table] == [0, 1] and all(r["calls"] == 2 for r in table)
    assert all(0 <= r["gate_near_zero_frac"] <= 1 and r["h_max_over_rms"] >= 1 for r in table)


def test_telemetry_needs_a_patched_model():
    with pytest.raises(ValueError, match="ffn.patch"):
        with ffn.telemetry.record(build("llama")):
            pass


# ----------------------------------------------------------------------------- what patch() does not know
def test_unknown_model_type_is_refused_naming_the_class():
    bert = T.BertModel(T.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, vocab_size=VOCAB))
    with pytest.raises(P.UnsupportedModuleError, match=r"BertModel .*'bert'"):
        ffn.patch(bert)
    report = ffn.patch(bert, skip_unknown=True)  # only what it knows: the nn.LayerNorms
    assert dict(report) == {"LayerNorm": 3}


def test_unknown_module_is_refused_naming_the_class():
    class MyMLP(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = build("llama")
    model.model.layers[0].mlp = MyMLP(model.model.layers[0].mlp)
    with pytest.raises(P.UnsupportedModuleError, match="MyMLP"):
        ffn.patch(model)
    assert not any(isinstance(m, P._Patched) for m in model.modules())  # refused before changing anything
    report = ffn.patch(model, skip_unknown=True)
    assert type(model.model.layers[0].mlp) is MyMLP and dict(report) == {"LlamaRMSNorm": 5, "LlamaMLP": 2}


def test_unknown_activation_is_refused_naming_module_and_activation():
    model = T.LlamaForCausalLM(T.LlamaConfig(**DECODER, **ATTN, hidden_act="relu2"))
    with pytest.raises(P.UnsupportedModuleError, match="LlamaMLP.*ReLUSquared"):
        ffn.patch(model)
    assert dict(ffn.patch(model, skip_unknown=True)) == {"LlamaRMSNorm": 5}


def test_known_mlp_without_an_ffn_op_is_skipped_with_a_warning():
    """A non-gated SiLU FFN (GPT-NeoX with hidden_act="silu") has no ffn op: left alone, reported."""
    model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**DECODER, num_attention_heads=4, hidden_act="silu"))
    with pytest.warns(UserWarning, match="ffn.patch left these modules unpatched: GPTNeoXMLP: no ffn op"):
        report = ffn.patch(model)
    assert dict(report) == {"LayerNorm": 5} and set(report.skipped) == {"GPTNeoXMLP"}


def test_import_ffn_does_not_import_transformers():
    code = "import sys, ffn\nprint('transformers' in sys.modules, callable(ffn.patch))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_patch_without_transformers_says_what_it_needs():
    code = ("import sys, torch, ffn\nsys.modules['transformers'] = None  # as if not installed\n"
            "try:\n    ffn.patch(torch.nn.Linear(2, 2))\nexcept ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ffn.patch runs Hugging Face transformers models and needs the transformers package" in done.stdout
