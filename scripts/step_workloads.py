"""The workloads of the issue's speed tables, shared by profile_step.py (where the time goes) and
bench_step.py (how long it takes): the norm + FFN sublayer and the harness's training step, each
built for one implementation.

Implementations: torch (plain PyTorch, F.* and nn.Linear), torch+compile (torch.compile of it,
Inductor), ffn (the ffn ops), ffn+compile (torch.compile of the code that calls them: the ffn ops
stay opaque calls, Inductor fuses what is around them).
"""

import torch
import torch.nn.functional as F

IMPLS = ("torch", "torch+compile", "ffn", "ffn+compile")
# (d_model, d_ff of the gated FFN, rows) of the sublayer table; the GELU FFN is 4 * d_model wide.
SUBLAYER_SHAPES = ((96, 256, 2048), (256, 683, 1024), (1024, 2816, 2048))
# (d_model, batch) of the step table, seq 128 and 4 layers.
STEP_SHAPES = ((96, 16), (256, 8))


def sublayer_width(design, d, d_ff):
    """The sublayer's FFN width: 4 d for the GELU FFN (A), the table's d_ff for SwiGLU (B)."""
    return 4 * d if design == "A" else d_ff


def maybe_compiled(fn, impl):
    return torch.compile(fn) if impl.endswith("+compile") else fn


def sublayer_fn(impl, d, d_ff, rows, design):
    """x + FFN(norm(x)), forward + backward: layer_norm + GELU FFN (A) or rms_norm + SwiGLU (B)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(d, generator=g)).requires_grad_() if design == "A" else None
    width = sublayer_width(design, d, d_ff)
    w_in = (torch.randn((1 if design == "A" else 2) * width, d, generator=g) / d ** 0.5).requires_grad_()
    b_in = (0.1 * torch.randn(w_in.shape[0], generator=g)).requires_grad_() if design == "A" else None
    w_out = (torch.randn(d, width, generator=g) / width ** 0.5).requires_grad_()
    b_out = (0.1 * torch.randn(d, generator=g)).requires_grad_() if design == "A" else None
    grad = torch.randn(rows, d, generator=g)
    ops = torch.ops.ffn

    if impl.startswith("torch"):
        def sublayer(x):
            if design == "A":
                n = F.layer_norm(x, (d,), w, b)
                return x + F.linear(F.gelu(F.linear(n, w_in, b_in)), w_out, b_out)
            n = F.rms_norm(x, (d,), w, 1e-6)
            gate, up = F.linear(n, w_in).chunk(2, dim=-1)
            return x + F.linear(F.silu(gate) * up, w_out)
    else:
        def sublayer(x):
            if design == "A":
                return x + ops.gelu_ffn(ops.layer_norm(x, w, b, 1e-5), w_in, b_in, w_out, b_out)
            return x + ops.swiglu(ops.rms_norm(x, w, None, 1e-6), w_in, None, w_out, None)

    forward = maybe_compiled(sublayer, impl)

    def step():
        for t in (x, w, b, w_in, b_in, w_out, b_out):
            if t is not None:
                t.grad = None
        forward(x).backward(grad)
    return step


def step_fn(impl, design, d_model, batch, seq, layers):
    """One forward + backward + AdamW step of the harness's TransformerLM (the cpu preset's model)."""
    from ffn.harness import data as textdata
    from ffn.harness.config import TrainConfig
    from ffn.harness.designs import parse_design
    from ffn.harness.model import TransformerLM
    from ffn.harness.train import make_optimizer, model_config

    config = TrainConfig.from_preset("cpu", d_model=d_model, d_ff=4 * d_model, batch_size=batch, seq_len=seq,
                                     n_layers=layers, backend="torch" if impl.startswith("torch") else "ffn")
    torch.manual_seed(0)
    model = TransformerLM(model_config(config, parse_design(design)))
    optimizer = make_optimizer(model, config)
    train_model = maybe_compiled(model, impl)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, textdata.VOCAB_SIZE, (batch, seq), generator=g)
    y = torch.randint(0, textdata.VOCAB_SIZE, (batch, seq), generator=g)

    def step():
        _, loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step
