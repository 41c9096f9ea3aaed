"""The ffn ops on DTensor: sharding strategies, tensor-parallel helpers, FSDP2 notes.

`import ffn` imports this module, which costs nothing: it does not import
torch.distributed.tensor (about 2 s). The strategies are registered
(register_sharding_strategies) as soon as torch.distributed.tensor is imported,
by init_device_mesh, fully_shard, parallelize_module or your own import,
whether that happens before or after `import ffn`. After that every public op
and every internal forward/backward op of ffn accepts DTensor arguments (all on
one mesh). The public ops are CompositeImplicitAutograd: with autograd on, they
decompose into the internal `_*_fwd` op before DTensor sees them (and its
backward runs the `_*_bwd` op); under torch.inference_mode DTensor receives the
public op itself. Both paths have strategies.

Strategies, for one mesh dimension (each mesh dimension independently):

- layer_norm / rms_norm / add_layer_norm / add_rms_norm (and their _fwd ops,
  _layer_norm_bwd, _rms_norm_bwd): x (the residual, s, grad_s) and the
  output sharded alike on any dim but the normalized (last) one, e.g.
  Shard(0) or Shard(1) of [B, T, d] (sequence parallel); weight and bias
  Replicate; the weight and bias gradients Partial (summed by DTensor when they
  are redistributed, e.g. by the optimizer step or full_tensor()). An x sharded
  on the normalized dim is not refused: DTensor redistributes it to the
  cheapest of these by its cost model (an all-gather to Replicate; for large
  tensors an all-to-all to Shard of a leading dim), as torch 2.14 does for its
  own F.layer_norm (torch 2.11's layer_norm always all-gathers).
- gelu_ffn, relu_ffn, swiglu/geglu/reglu (and _gelu_ffn_fwd/_bwd, _relu_ffn_fwd/_bwd,
  _gated_ffn_fwd/_bwd):
    * tensor parallel: x Replicate, the input projection column-parallel, the
      down projection row-parallel, the output Partial. For gelu_ffn and relu_ffn w1 and b1
      are Shard(0); for the gated ops w_gate_up and b_gate_up are
      `_StridedShard(0, split_factor=2)` (GATE_UP_SHARD): rank k holds
      [gate_k; up_k], the k-th block of the gate rows followed by the k-th
      block of the up rows, so each rank's gate and up rows stay together while
      the DTensor keeps the ordinary [gate rows; up rows] layout (its
      full_tensor() is the unsharded weight, and a state_dict loads unchanged).
      w_down is Shard(1); b_down is Partial (DTensor turns the replicated bias
      into Partial, b/n per rank, so it is added once). The pre-activation is
      Shard(1) (gelu) or _StridedShard(1, split_factor=2) (gated). Gradients:
      those of the weights have the weights' placements, that of b_down is
      Replicate and that of x is Partial.
    * data parallel inside the op: x and the output sharded on a leading dim,
      all weights Replicate, weight gradients Partial. For x of [rows, d] any
      leading sharding works; for x of [B, T, d] the dim must divide evenly and
      the mesh must be 1-D (else DTensor moves x to a layout that works).
  x sharded on d_model (the contraction dim) is refused with an error.
- gated_activation / _gated_activation_bwd: gate_up sharded on any leading dim;
  on the last dim only as _StridedShard(-1, split_factor=2) (paired gate/up
  chunks), the output then Shard(-1). A plain Shard of the last dim is refused.
- bias_gelu / _bias_gelu_bwd: x sharded on any dim (bias Replicate, or Shard(0)
  when x is sharded on its last dim); the bias gradient Partial or Shard(0).
- ffn_stats: Replicate only (its max entry and per-call outlier threshold have
  no Partial form). For per-rank telemetry call it on .to_local() tensors and
  combine with ffn.telemetry.all_reduce_.

The in-place backward ops (_layer_norm_bwd_, _rms_norm_bwd_) have no strategy:
autograd uses them for plain tensors only (ffn's in_place_backward falls back to
the out-of-place backward for DTensor gradients).

Every op also takes all-Replicate inputs. DTensor redistributes any other
input layout to the cheapest of these; only the layouts that cannot be computed
locally without changing what the op means are refused with a ValueError
(wrapped by DTensor in a RuntimeError) that names the op and the fix.

Tensor parallelism for the modules: FFNParallel (a ParallelStyle for
parallelize_module) and parallelize_ffn; norms take torch's SequenceParallel
unchanged. FSDP2 (fully_shard) alone needs nothing from here: it all-gathers
parameters into plain tensors before each forward. FSDP2 on top of TP (a 2-D
("dp", "tp") mesh) takes fsdp_shard_placement as its shard_placement_fn (and,
for a gated FFN with biases, FFNParallel(replicate_in_bias=True)) so that the
global view of w_gate_up/b_gate_up stays exact. Without DTensor,
gate_up_shard / interleave_gate_up / deinterleave_gate_up cut and repack the
per-rank [gate_k; up_k] blocks. See README.md, "Distributed".
"""

import importlib.abc
import importlib.util
import math
import sys
import warnings

import torch

__all__ = [
    "GATE_UP_SHARD_SPLIT_FACTOR",
    "FFNParallel",
    "SHARDED_OPS",
    "gate_up_placement",
    "deinterleave_gate_up",
    "fsdp_shard_placement",
    "gate_up_shard",
    "interleave_gate_up",
    "parallelize_ffn",
    "register_sharding_strategies",
]

_DTENSOR = "torch.distributed.tensor"

# w_gate_up/b_gate_up hold two halves (gate, up): its tensor-parallel placement
# is _StridedShard(0, split_factor=2).
GATE_UP_SHARD_SPLIT_FACTOR = 2

# Every op that gets a strategy: (name, overload).
SHARDED_OPS = (
    "layer_norm", "rms_norm", "_layer_norm_fwd", "_rms_norm_fwd", "_layer_norm_bwd", "_rms_norm_bwd",
    "add_layer_norm", "add_rms_norm", "_add_layer_norm_fwd", "_add_rms_norm_fwd",
    "gelu_ffn", "relu_ffn", "swiglu", "geglu", "reglu", "_gelu_ffn_fwd", "_relu_ffn_fwd", "_gated_ffn_fwd",
    "_gelu_ffn_bwd", "_relu_ffn_bwd", "_gated_ffn_bwd",
    "gated_activation", "_gated_activation_bwd", "bias_gelu", "_bias_gelu_bwd", "ffn_stats",
)

_registered = False


# ----------------------------------------------------------------------------- placements
def _p():
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    return Partial, Replicate, Shard, _StridedShard


# DTensor redistributes _StridedShard placements (the tensor-parallel gate/up packing, and the
# strided layouts some strategies produce) from torch 2.13 on: seen working on 2.13.0 and 2.14.1,
# while torch 2.11 rejects them ("... is unable to be interpreted into a corresponding
# shard_order"); 2.12 is untested. Everything else here works on 2.11 too.
STRIDED_SHARD_MIN_TORCH = (2, 13)


def strided_shard_supported():
    """Whether this torch's DTensor handles _StridedShard placements (STRIDED_SHARD_MIN_TORCH)."""
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= STRIDED_SHARD_MIN_TORCH


def gate_up_placement(dim=0):
    """The tensor-parallel placement of w_gate_up (dim 0) and b_gate_up, or of a gate_up
    activation (dim -1): _StridedShard(dim, split_factor=2), rank k holding [gate_k; up_k]."""
    _, _, _, strided = _p()
    return strided(dim, split_factor=GATE_UP_SHARD_SPLIT_FACTOR)


def _sharded_dims(spec):
    """{tensor dim: placement} of the mesh dims that shard `spec` (Shard or _StridedShard)."""
    _, _, shard, strided = _p()
    ndim = spec.ndim
    return [(p.dim % ndim, p) for p in spec.placements if isinstance(p, (shard, strided))]


def _refuse(op, name, spec, dim, fix):
    for tensor_dim, placement in _sharded_dims(spec):
        if tensor_dim == dim:
            raise ValueError(
                f"ffn.{op}: {name} is sharded along dim {dim} ({placement}), which the op "
                f"{fix}; it cannot be computed from the local shards. Redistribute {name} first "
                f"(e.g. to Replicate(), or to Shard of a leading dim)."
            )


def _rep(t):
    """Replicate() for a tensor argument, None for an absent (None) one."""
    return None if t is None else _p()[1]()


def _same(t, placement):
    return None if t is None else placement


# ----------------------------------------------------------------------------- norms
def _norm_strategies(x):
    """The placements of x, and of everything shaped like x or x.shape[:-1], that a norm takes:
    Replicate, or Shard of a leading dim. DTensor redistributes any other x (one sharded on the
    normalized dim) to the cheapest of them, as it does for torch's own layer_norm."""
    _, replicate, shard, _ = _p()
    return [replicate()] + [shard(d) for d in range(x.ndim - 1)]


def _norm_fwd(n_out, fused_add=False):
    """layer_norm/rms_norm (and their _fwd ops) or, with fused_add, the add + norms: the
    residual, s and the statistics are placed like x."""
    def strategy(x, *args):
        tensors = 2 if fused_add else 1
        residual = args[:tensors - 1]
        weight, bias, *static = args[tensors - 1:]
        out = []
        for px in _norm_strategies(x):
            inputs = [px, *([px] * len(residual)), _rep(weight), _rep(bias), *([None] * len(static))]
            out.append(([px] * n_out, inputs))
        return out

    return strategy


def _norm_bwd(n_stats):
    def strategy(grad_y, x, *rest):
        stats, (weight, bias, weight_grad, bias_grad, *extra) = rest[:n_stats], rest[n_stats:]
        grad_s = extra[1] if len(extra) > 1 else None
        partial, replicate, _, _ = _p()
        out = []
        for px in _norm_strategies(x):
            red = replicate() if isinstance(px, replicate) else partial()
            grads = [red if weight_grad else replicate(), red if bias_grad else replicate()]
            inputs = [px, px, *([px] * n_stats), _rep(weight), _rep(bias), None, None]
            # weight_offset, then grad_s (shaped like x), when passed
            inputs += [None, _same(grad_s, px)][:len(extra)]
            out.append(([px, *grads], inputs))
        return out

    return strategy


# ----------------------------------------------------------------------------- FFNs
def _row_placement(x, d):
    """The placement of the [rows, F] pre-activation when x [..., d_model] is sharded on
    its leading dim d, or None when no placement describes the local rows exactly."""
    _, _, shard, strided = _p()
    if x.ndim == 2:
        return shard(0)
    shape = x.shape
    n = x.mesh.size()
    if x.mesh.ndim != 1 or shape[d] % n:
        return None
    outer = math.prod(shape[:d])
    return shard(0) if outer == 1 else strided(0, split_factor=outer)


def _ffn_layouts(op, x, gated):
    """[(kind, x placement, preact placement)] for the op's strategies."""
    partial, replicate, shard, _ = _p()
    n = x.ndim
    _refuse(op, "x", x, n - 1, "contracts over (d_model)")
    layouts = [("replicate", replicate(), replicate()),
               ("tp", replicate(), gate_up_placement(1) if gated else shard(1))]
    for d in range(n - 1):
        rows = _row_placement(x, d)
        if rows is not None:
            layouts.append(("dp", shard(d), rows))
    return layouts


def _ffn_fwd(op, gated, with_preact):
    def strategy(x, w_in, b_in, w_out, b_out, *_args):
        partial, replicate, shard, _ = _p()
        # keep_preact=False (the internal ops' last argument): preact is an empty [0], Replicate.
        keeps_preact = not (_args and _args[-1] is False)
        out = []
        for kind, px, pre in _ffn_layouts(op, x, gated):
            pre = pre if keeps_preact else replicate()
            if kind == "tp":
                p_in = gate_up_placement(0) if gated else shard(0)
                inputs = [px, p_in, _same(b_in, p_in), shard(1), _same(b_out, partial())]
                outputs = [partial(), pre]
            else:
                inputs = [px, replicate(), _rep(b_in), replicate(), _rep(b_out)]
                outputs = [px, pre]
            out.append((outputs if with_preact else outputs[:1], inputs + [None] * len(_args)))
        return out

    return strategy


def _ffn_bwd(op, gated):
    def strategy(grad_out, x, preact, w_in, w_out, *static):
        grad_mask = static[-1]  # after the activation, for the ops that take one
        partial, replicate, shard, _ = _p()
        out = []
        for kind, px, pre in _ffn_layouts(op, x, gated):
            if kind == "tp":
                p_in = gate_up_placement(0) if gated else shard(0)
                grads = [partial(), p_in, p_in, shard(1), replicate()]
                inputs = [replicate(), px, pre, p_in, shard(1)]
            elif kind == "dp":
                grads = [px, partial(), partial(), partial(), partial()]
                inputs = [px, px, pre, replicate(), replicate()]
            else:
                grads = [replicate()] * 5
                inputs = [replicate()] * 5
            # A gradient not asked for is an empty [0] tensor: Replicate.
            grads = [g if needed else replicate() for g, needed in zip(grads, grad_mask)]
            out.append((grads, inputs + [None] * len(static)))
        return out

    return strategy


# ----------------------------------------------------------------------------- elementwise pieces
def _gated_activation_layouts(op, gate_up, name):
    """[(gate_up placement, h placement)]."""
    _, replicate, shard, strided = _p()
    n = gate_up.ndim
    for tensor_dim, placement in _sharded_dims(gate_up):
        if tensor_dim == n - 1 and placement != gate_up_placement(n - 1):
            raise ValueError(
                f"ffn.{op}: {name} is sharded along its last dim ({placement}), which holds the gate "
                f"half and then the up half; a shard of it does not pair each gate column with its up "
                f"column. Shard it as _StridedShard({n - 1}, split_factor=2) "
                f"(ffn.distributed.gate_up_placement(-1): rank k holds [gate_k | up_k]), "
                f"or redistribute it to Replicate() or Shard of a leading dim."
            )
    layouts = [(replicate(), replicate())] + [(shard(d), shard(d)) for d in range(n - 1)]
    layouts.append((gate_up_placement(n - 1), shard(n - 1)))
    return layouts


def _gated_activation(gate_up, activation="silu"):
    return [([h], [g, None]) for g, h in _gated_activation_layouts("gated_activation", gate_up, "gate_up")]


def _gated_activation_bwd(grad, gate_up, activation):
    return [([g], [h, g, None]) for g, h in _gated_activation_layouts("_gated_activation_bwd", gate_up, "gate_up")]


def _bias_gelu_layouts(x):
    """[(x placement, bias placement, bias-gradient placement)]."""
    partial, replicate, shard, _ = _p()
    n = x.ndim
    layouts = [(replicate(), replicate(), replicate())]
    layouts += [(shard(d), replicate(), partial()) for d in range(n - 1)]
    layouts.append((shard(n - 1), shard(0), shard(0)))
    return layouts


def _bias_gelu(x, bias, approximate="none"):
    return [([px], [px, _same(bias, pb), None]) for px, pb, _ in _bias_gelu_layouts(x)]


def _bias_gelu_bwd(grad, x, bias, approximate, bias_grad):
    _, replicate, _, _ = _p()
    return [([px, pg if bias_grad else replicate()], [px, px, _same(bias, pb), None, None])
            for px, pb, pg in _bias_gelu_layouts(x)]


def _ffn_stats(ffn_input, preact, activation, gated, near_zero=None, large=None, outlier=None):
    _, replicate, _, _ = _p()
    return [([replicate()], [replicate(), replicate(), None, None, None, None, None])]


def _strategies():
    return {
        "layer_norm": _norm_fwd(1),
        "rms_norm": _norm_fwd(1),
        "_layer_norm_fwd": _norm_fwd(3),
        "_rms_norm_fwd": _norm_fwd(2),
        "_layer_norm_bwd": _norm_bwd(2),
        "_rms_norm_bwd": _norm_bwd(1),
        "add_layer_norm": _norm_fwd(2, fused_add=True),
        "add_rms_norm": _norm_fwd(2, fused_add=True),
        "_add_layer_norm_fwd": _norm_fwd(4, fused_add=True),
        "_add_rms_norm_fwd": _norm_fwd(3, fused_add=True),
        "gelu_ffn": _ffn_fwd("gelu_ffn", gated=False, with_preact=False),
        "relu_ffn": _ffn_fwd("relu_ffn", gated=False, with_preact=False),
        "_relu_ffn_fwd": _ffn_fwd("relu_ffn", gated=False, with_preact=True),
        "_relu_ffn_bwd": _ffn_bwd("_relu_ffn_bwd", gated=False),
        **{op: _ffn_fwd(op, gated=True, with_preact=False) for op in ("swiglu", "geglu", "reglu")},
        "_gelu_ffn_fwd": _ffn_fwd("gelu_ffn", gated=False, with_preact=True),
        "_gated_ffn_fwd": _ffn_fwd("_gated_ffn_fwd", gated=True, with_preact=True),
        "_gelu_ffn_bwd": _ffn_bwd("_gelu_ffn_bwd", gated=False),
        "_gated_ffn_bwd": _ffn_bwd("_gated_ffn_bwd", gated=True),
        "gated_activation": _gated_activation,
        "_gated_activation_bwd": _gated_activation_bwd,
        "bias_gelu": _bias_gelu,
        "_bias_gelu_bwd": _bias_gelu_bwd,
        "ffn_stats": _ffn_stats,
    }


def _first_static_arg(overload):
    """Index of the first argument that is not a Tensor or Tensor?: from there on the args
    (eps, activation, grad_mask, bias_grad...) enter DTensor's sharding cache key.
    register_sharding keys only on int arguments, and the ops' bool flags change which
    gradients come back empty."""
    for i, arg in enumerate(overload._schema.arguments):
        t = arg.type
        if isinstance(t, torch.OptionalType):
            t = t.getElementType()
        if not isinstance(t, torch.TensorType):
            return i
    return len(overload._schema.arguments)


def register_sharding_strategies():
    """Registers the DTensor sharding strategies of every op in SHARDED_OPS (once; later
    calls do nothing). Imports torch.distributed.tensor. Returns the op names."""
    global _registered
    if _registered:
        return SHARDED_OPS
    from . import _C  # noqa: F401  (the ops must exist)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor.experimental import register_sharding

    strategies = _strategies()
    assert set(strategies) == set(SHARDED_OPS)
    propagator = DTensor._op_dispatcher.sharding_propagator
    for name in SHARDED_OPS:
        overload = getattr(torch.ops.ffn, name).default
        register_sharding(overload)(strategies[name])
        propagator.op_to_schema_info[overload] = RuntimeSchemaInfo(
            static_argnum=_first_static_arg(overload), needs_pytree=True)
    _registered = True
    return SHARDED_OPS


class _RegisterOnDTensorImport(importlib.abc.MetaPathFinder):
    """Registers the strategies right after torch.distributed.tensor has been imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DTENSOR:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                register_sharding_strategies()
            except Exception as e:  # never break the import of torch.distributed.tensor
                warnings.warn(f"ffn: could not register the DTensor sharding strategies: {e!r}", stacklevel=2)

        spec.loader.exec_module = exec_and_register
        return spec


def _install():
    if _DTENSOR in sys.modules:
        register_sharding_strategies()
    elif not any(isinstance(f, _RegisterOnDTensorImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnDTensorImport())


# ----------------------------------------------------------------------------- gate/up packing
def gate_up_shard(w_gate_up, rank, world_size):
    """Rank `rank`'s block [gate_k; up_k] of a w_gate_up [2F, d] (or b_gate_up [2F]) in the
    ordinary layout (gate rows, then up rows): what a tensor-parallel rank's local
    w_gate_up holds (DTensor: _StridedShard(0, split_factor=2)). F must divide by world_size."""
    gate, up = _halves(w_gate_up, world_size)
    return torch.cat([gate.chunk(world_size)[rank], up.chunk(world_size)[rank]])


def interleave_gate_up(w_gate_up, world_size):
    """w_gate_up repacked as per-shard blocks [gate_0; up_0; gate_1; up_1; ...], so that a
    plain even split along dim 0 (Shard(0), Megatron-style slicing) gives rank k its
    [gate_k; up_k]. The result is a different tensor for the ops: use it only for local
    shards (with DTensor, keep the ordinary layout and gate_up_placement())."""
    return torch.cat([gate_up_shard(w_gate_up, k, world_size) for k in range(world_size)])


def deinterleave_gate_up(packed, world_size):
    """The inverse of interleave_gate_up: back to [gate rows; up rows]."""
    blocks = [b.chunk(2) for b in packed.chunk(world_size)]
    return torch.cat([torch.cat([g for g, _ in blocks]), torch.cat([u for _, u in blocks])])


def _halves(w, world_size):
    if w.shape[0] % (2 * world_size):
        raise ValueError(f"w_gate_up has {w.shape[0]} rows: 2*d_ff must divide by 2*world_size={2 * world_size}")
    return w.chunk(2)


# ----------------------------------------------------------------------------- FSDP2 on top of tensor parallel
def fsdp_shard_placement(param):
    """A `shard_placement_fn` for fully_shard on a tensor-parallel model (2-D, FSDP2 across
    "dp", TP inside "tp"): Shard(1) for a matrix the TP mesh shards as _StridedShard(0)
    (w_gate_up), None (FSDP2's default Shard(0)) for everything else.

    FSDP2 (torch 2.14) composes its own Shard(0) with a TP placement on the same dim as if
    the TP placement were a plain Shard: for w_gate_up the training math stays exact, but
    the DTensor's global view (full_tensor(), state_dict(), DCP) has its rows permuted.
    Sharding w_gate_up along d_model instead keeps the global view exact. A gated b_gate_up
    has no other dim: under FSDP2 + TP its global view is permuted (its values train exactly);
    LLaMA-style gated FFNs have no biases."""
    from torch.distributed.tensor import DTensor, Shard

    _, _, _, strided = _p()
    if isinstance(param, DTensor) and param.ndim > 1 and any(
            isinstance(p, strided) and p.dim == 0 for p in param.placements):
        return Shard(1)
    return None


# ----------------------------------------------------------------------------- tensor parallel modules
def _make_ffn_parallel():
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle
    from torch.nn import Parameter

    from .modules import FFN

    register_sharding_strategies()

    class FFNParallel(ParallelStyle):
        """Tensor parallelism for an ffn FFN module (GeluFFN, SwiGLU, GeGLU, ReGLU), as
        ColwiseParallel on the input projection and RowwiseParallel on the down projection
        in one style: w1/b1 Shard(0), or w_gate_up/b_gate_up _StridedShard(0, split_factor=2);
        w_down/w2 Shard(1), b_down/b2 Replicate. The input arrives in input_layouts
        (default Replicate(); Shard(1) for sequence parallel) and is all-gathered; the
        Partial output is reduced to output_layouts (default Replicate(); Shard(1): a
        reduce-scatter). use_local_output returns a plain tensor.

        replicate_in_bias=True keeps b1/b_gate_up Replicate (the op slices it locally
        and its gradient is all-gathered): for a gated FFN with a bias under FSDP2 + TP,
        where FSDP2 would otherwise permute b_gate_up's global view (fsdp_shard_placement)."""

        def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output=True,
                     replicate_in_bias=False):
            super().__init__()
            self.input_layouts = (input_layouts or Replicate(),)
            self.output_layouts = (output_layouts or Replicate(),)
            self.use_local_output = use_local_output
            self.replicate_in_bias = replicate_in_bias

        def _partition(self, name, module, mesh):
            if not isinstance(module, FFN):
                if name:  # the FFN's own projections (nn.Linear): placed with the FFN, below
                    return
                raise TypeError(f"FFNParallel applies to ffn FFN modules, got {type(module).__name__}")
            _, replicate, shard, _ = _p()
            (w_in, b_in), (w_out, b_out) = module.in_proj(), module.out_proj()
            if module.gated and not strided_shard_supported():
                raise RuntimeError(
                    f"ffn.distributed: tensor-parallel gated FFNs shard w_gate_up as _StridedShard, which DTensor "
                    f"in torch {torch.__version__} cannot redistribute; use torch >= "
                    f"{'.'.join(map(str, STRIDED_SHARD_MIN_TORCH))}")
            p_in = gate_up_placement(0) if module.gated else shard(0)
            p_b_in = replicate() if self.replicate_in_bias else p_in
            placements = {id(w_in): p_in, id(b_in): p_b_in, id(w_out): shard(1), id(b_out): replicate()}
            for p_name, param in list(module.named_parameters()):
                if id(param) in placements:
                    owner, _, leaf = p_name.rpartition(".")
                    dt = distribute_tensor(param.detach(), mesh, [placements[id(param)]])
                    module.get_submodule(owner).register_parameter(
                        leaf, Parameter(dt, requires_grad=param.requires_grad))

        @staticmethod
        def _prepare_input(input_layouts, mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, input_layouts, run_check=False)
            if x.placements != (Replicate(),):
                x = x.redistribute(placements=(Replicate(),), async_op=False)
            return (x, *inputs[1:])

        @staticmethod
        def _prepare_output(output_layouts, use_local_output, mod, outputs, mesh):
            def convert(t):
                if t.placements != output_layouts:
                    t = t.redistribute(placements=output_layouts, async_op=False)
                return t.to_local() if use_local_output else t

            return convert(outputs)

        def _apply(self, module, device_mesh):
            from functools import partial

            return distribute_module(
                module, device_mesh, self._partition,
                partial(self._prepare_input, self.input_layouts),
                partial(self._prepare_output, self.output_layouts, self.use_local_output),
            )

    return FFNParallel


def parallelize_ffn(module, mesh, **style_kwargs):
    """parallelize_module(module, mesh, FFNParallel(**style_kwargs)): the module, tensor-parallel in place."""
    from torch.distributed.tensor.parallel import parallelize_module

    style = __getattr__("FFNParallel")(**style_kwargs)
    return parallelize_module(module, mesh, style)


def __getattr__(name):
    if name == "FFNParallel":
        cls = _make_ffn_parallel()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install()
