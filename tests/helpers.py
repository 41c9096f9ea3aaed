"""Accuracy checks and input builders shared by the tests.

How results are judged: every op is run three ways on the same inputs,
  ours   = torch.ops.ffn.<op>(inputs)                  (the dtype under test)
  theirs = the eager torch composite (ffn.reference)  (the same dtype)
  ref    = the eager composite on float64 copies of the same, already rounded, inputs
and `assert_accurate` requires
  (a) max|ours - ref| <= C * (eps(dtype) * sqrt(m) + eps(accumulation dtype) * sqrt(n)) * scale
      with scale = max|ref|: rounding errors in the dtype of the m intermediate
      values that a result sums (m = 1 for the norms and elementwise ops: one
      output rounding; the FFNs sum hidden activations and pre-activation
      gradients stored in the dtype), plus a sum of n terms in the accumulation
      type; C = 4 covers the few roundings per term;
  (b) max|ours - ref| <= 2 * max|theirs - ref| + eps(dtype) * scale
      : no less accurate than torch itself, up to a factor 2 and one rounding;
      only where the result has at least 16 elements (a max over fewer is too
      noisy to rank two implementations) and is not float64 (there the
      reference is torch's own float64 result, not a more precise one).
On an accelerator the check functions also run our op's CPU kernels on the same
inputs, and `assert_agrees_with_cpu` requires
  (c) max|ours - ours on CPU| <= 2 * the bound of (a): each may be that far from ref.
"""

import math

import torch

import ffn

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)
SHORT = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# The norms' (x dtype, parameter dtype) pairs: same dtype, or float32 parameters with half x.
NORM_DTYPES = [(t, t) for t in DTYPES] + [(t, torch.float32) for t in HALF_DTYPES]
NORM_DTYPE_IDS = [SHORT[x] if x == p else f"{SHORT[x]}-w{SHORT[p]}" for x, p in NORM_DTYPES]

ACCURACY_C = 4.0
VS_TORCH_FACTOR = 2.0
VS_TORCH_MIN_ELEMENTS = 16


def eps(dtype):
    return torch.finfo(dtype).eps


def acc_eps(dtype):
    """Machine epsilon of the accumulation type (float32 for half and float32, float64 for float64)."""
    return eps(torch.float64 if dtype == torch.float64 else torch.float32)


def max_err(t, ref):
    if t.numel() == 0:
        return 0.0
    return (t.detach().double() - ref.detach()).abs().max().item()


def accuracy_bound(dtype, terms, rounded_terms, scale):
    """The bound of (a) in the module docstring."""
    return ACCURACY_C * (eps(dtype) * math.sqrt(rounded_terms) + acc_eps(dtype) * math.sqrt(terms)) * scale


def assert_accurate(ours, ref, theirs=None, *, terms=1, rounded_terms=1, name="output", precision=None,
                    scale=None):
    """Checks (a) and (b) of the module docstring. `terms` (n): longest sum in the computation;
    `rounded_terms` (m): how many values rounded to the dtype a result sums;
    `precision`: the dtype the result was computed in, when it differs from ours.dtype
    (a gradient computed under autocast and cast up to its float32 leaf); `scale`: the
    magnitude of the terms the result is made of, when it is larger than max|ref| (a
    result that cancels, e.g. LayerNorm's grad_x: errors scale with its terms)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref.shape)}"
    if theirs is not None:
        assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, torch gives {theirs.dtype}"
    if ours.numel() == 0:
        return
    dtype = ours.dtype if precision is None else precision
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    scale = max(ref.detach().abs().max().item(), scale or 0.0)
    err = max_err(ours, ref)
    bound = accuracy_bound(dtype, terms, rounded_terms, scale)
    assert err <= bound, (
        f"{name} ({dtype}): max error {err:.3e} > bound {bound:.3e} "
        f"(max|ref| = {scale:.3e}, {err / (eps(dtype) * scale) if scale else float('inf'):.2f} eps)"
    )
    if theirs is not None and dtype != torch.float64 and ours.numel() >= VS_TORCH_MIN_ELEMENTS:
        torch_err = max_err(theirs, ref)
        limit = VS_TORCH_FACTOR * torch_err + eps(dtype) * scale
        assert err <= limit, (
            f"{name} ({dtype}): max error {err:.3e} is worse than torch's {torch_err:.3e} "
            f"(limit {limit:.3e}, max|ref| = {scale:.3e})"
        )


def to64(t):
    """A float64 leaf copy of t (None stays None), requiring grad like t."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)


def leaf(t):
    """A new leaf viewing t's data with t's strides (None stays None), requiring grad like t."""
    if t is None:
        return None
    return t.detach().requires_grad_(t.requires_grad)


def grads(out, inputs, grad_out):
    """Gradients of <out, grad_out> for the inputs that require grad (None for the others)."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def run_three_ways(ours_fn, ref_fn, inputs, grad_out=None, torch_grads=True):
    """Runs ours_fn and ref_fn on copies of `inputs`, and ref_fn on float64 copies.

    Returns ((ours, theirs, ref) outputs, [(ours, theirs, ref) gradient per input or None]).
    Gradients are computed when grad_out is given, for the inputs that require grad;
    with torch_grads=False torch's own low-precision gradients are not (theirs is None).
    """
    copies = [[leaf(t) for t in inputs] for _ in range(2)] + [[to64(t) for t in inputs]]
    outs = [ours_fn(*copies[0]), ref_fn(*copies[1]), ref_fn(*copies[2])]
    if grad_out is None:
        return outs, None
    per_run = [
        grads(out, c, g) if i != 1 or torch_grads else [None] * len(inputs)
        for i, (out, c, g) in enumerate(zip(outs, copies, (grad_out, grad_out, grad_out.double())))
    ]
    return outs, [None if g[0] is None else g for g in zip(*per_run)]


def on_cpu(fn, inputs, grad_out=None):
    """fn on CPU copies of `inputs` (requiring grad like them): (output, [gradient per input or None])."""
    copies = [None if t is None else t.detach().cpu().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*copies)
    return out, (None if grad_out is None else grads(out, copies, grad_out.cpu()))


def assert_agrees_with_cpu(ours, cpu, ref, *, terms=1, rounded_terms=1, name="output", scale=None):
    """(c) of the module docstring: ours (on an accelerator) vs `cpu`, our CPU kernels' result on
    the same inputs; `ref`, terms, rounded_terms and scale as given to assert_accurate for ours."""
    assert cpu.shape == ours.shape and cpu.dtype == ours.dtype, f"{name}: CPU gives {cpu.dtype} {tuple(cpu.shape)}"
    if ours.numel() == 0:
        return
    scale = max(ref.detach().abs().max().item(), scale or 0.0)
    err = max_err(ours, cpu.detach().to(ours.device).double())
    bound = 2 * accuracy_bound(ours.dtype, terms, rounded_terms, scale)
    assert err <= bound, (
        f"{name} ({ours.dtype}): {ours.device} and CPU differ by {err:.3e} > {bound:.3e} (max|ref| = {scale:.3e})"
    )


def assert_same_across_threads(compute):
    """compute() -> tuple of tensors gives bit-identical results twice with 2 threads and once with 1."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = compute(), compute()
        torch.set_num_threads(1)
        single = compute()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0, requires_grad=False):
    t = torch.randn(*shape, dtype=torch.float32, device=device) * scale + shift
    return t.to(dtype).requires_grad_(requires_grad)


def reference_op(name):
    return getattr(ffn.reference, name)


def ffn_op(name):
    return getattr(torch.ops.ffn, name)


class OpsCalled(torch.overrides.TorchFunctionMode):
    """Records the names of the torch functions and ops called inside the block."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))
