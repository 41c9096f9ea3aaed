"""torch.vmap over the public ops: batching rules of their own (ops/_registrations.py), so no
per-sample fallback and no "performance drop" warning. Batched row inputs (x, residual) run as more
rows of one call; batched parameters run once per sample."""

import pytest
import torch

from test_outputs import public_calls

CALLS = list(public_calls("cpu"))
# The row inputs of each op: x, and the residual of the fused add + norms.
ROW_ARGS = {name: (0, 1) if name.startswith("add_") else (0,) for name, *_ in CALLS}
ROWWISE = {"layer_norm", "rms_norm", "gemma_rms_norm", "add_layer_norm", "add_rms_norm", "gated_activation",
           "bias_gelu"}


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def per_sample(op, args, batched, dim=0):
    """The op on each sample (batched args sliced at dim), stacked: what vmap means."""
    size = args[batched[0]].shape[dim]
    samples = [as_tuple(op(*(a.select(dim, i) if j in batched else a for j, a in enumerate(args))))
               for i in range(size)]
    return tuple(torch.stack(outs) for outs in zip(*samples))


@pytest.mark.parametrize("call", CALLS, ids=[c[0] for c in CALLS])
def test_vmap_over_rows_without_the_fallback(call, capfd):
    name, op, _, args = call
    args = detached(args)
    rows = ROW_ARGS[name]
    batched = [a.unsqueeze(1).expand(a.shape[0], 3, *a.shape[1:]).clone() if i in rows else a
               for i, a in enumerate(args)]
    in_dims = tuple(1 if i in rows else None for i in range(len(args)))
    got = as_tuple(torch.vmap(op, in_dims=in_dims)(*batched))
    want = per_sample(op, batched, rows, dim=1)
    for g, w in zip(got, want, strict=True):
        if name in ROWWISE:
            assert torch.equal(g, w)  # each row computed alone either way
        else:  # the FFNs' GEMMs see more rows at once: another BLAS blocking, float rounding apart
            torch.testing.assert_close(g, w)
    assert "performance drop" not in capfd.readouterr().err


@pytest.mark.parametrize("name", ["add_rms_norm", "add_layer_norm"])
def test_vmap_with_an_unbatched_residual(name):
    _, op, _, args = next(c for c in CALLS if c[0] == name)
    x, residual, *rest = detached(args)
    xs = torch.stack([x, 2 * x])
    got = torch.vmap(lambda t: op(t, residual, *rest))(xs)
    want = per_sample(lambda t: op(t, residual, *rest), [xs], [0])
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("call", CALLS, ids=[c[0] for c in CALLS])
def test_vmap_over_per_sample_parameters(call, capfd):
    """Batched weights (an ensemble of models) run the op once per sample, the same bits as a loop."""
    name, op, _, args = call
    args = detached(args)
    params = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in ROW_ARGS[name]]
    if not params:
        pytest.skip(f"{name} has no parameter tensor")
    batched = [torch.stack([a, 0.5 * a]) if i in params else a for i, a in enumerate(args)]
    in_dims = tuple(0 if i in params else None for i in range(len(args)))
    got = as_tuple(torch.vmap(op, in_dims=in_dims)(*batched))
    want = per_sample(op, batched, params)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert "performance drop" not in capfd.readouterr().err


@pytest.mark.parametrize("call", CALLS, ids=[c[0] for c in CALLS])
def test_backward_through_vmap(call):
    """Autograd outside vmap records the batched call: the gradients are those of the unbatched call
    on the same rows."""
    name, op, _, args = call
    leaves = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    rows = ROW_ARGS[name]
    stacked = [torch.stack([a, a.flip(0)]) if i in rows else a for i, a in enumerate(leaves)]
    in_dims = tuple(0 if i in rows else None for i in range(len(leaves)))
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    loss = sum(o.square().sum() for o in as_tuple(torch.vmap(op, in_dims=in_dims)(*stacked)))
    got = torch.autograd.grad(loss, tensors)
    flat = [a.flatten(0, 1) if i in rows else a for i, a in enumerate(stacked)]
    loss = sum(o.square().sum() for o in as_tuple(op(*flat)))
    want = torch.autograd.grad(loss, tensors)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
