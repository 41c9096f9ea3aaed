"""FSDP2 and tensor parallelism of the harness's TransformerLM (model.py), on the device
mesh of processes.init_dist.

fsdp: fully_shard of every Block, then of the root (embeddings, final norm, tied head), on the
  "dp" mesh; with AMP on CUDA a MixedPrecisionPolicy (bf16 parameters, fp32 gradient
  reduction) takes the place of autocast, as in torchtitan. Only Blocks and the root are
  FSDP units and the harness calls nothing on them but forward (the FFN's
  forward_with_preact runs inside Block.forward, where the block's parameters are already
  gathered), so no register_fsdp_forward_method is needed.
tp: torchtitan's plan on the "tp" mesh, norms replicated:
    tok_emb   RowwiseParallel (vocab rows sharded; its weight is the tied head's)
    pos_emb   replicated
    attn.qkv  column-parallel: each rank holds the q, k and v rows of its heads, the packed
              [q; k; v] weight sharded as _StridedShard(0, split_factor=3) (rank k: [q_k; k_k; v_k],
              the DTensor's global view, state_dict and checkpoints unchanged); heads split across ranks
    attn.proj RowwiseParallel (its input is the local heads' output)
    ffn       ffn.distributed.FFNParallel (column-parallel in, row-parallel down)
    norms     replicated (DTensor Replicate parameters; every rank computes the same norm)
    head      ColwiseParallel on the tied weight, logits all-gathered (Replicate), so the loss
              is computed as in one process
  Every parameter is a DTensor on the tp mesh (so under fsdp+tp all are on one 2-D mesh).
fsdp+tp: the tp plan on mesh["tp"], then fully_shard on mesh["dp"] with
  ffn.distributed.fsdp_shard_placement, and the packed input biases (b_gate_up, qkv.bias)
  kept Replicate on tp (FFNParallel(replicate_in_bias=True)): the global view of every
  parameter stays exact (ffn/distributed.py, "FSDP2 on top of tensor parallel").

Evaluation, the probes and the telemetry that reads weights run on a plain replica of the
model on every rank (make_replica / sync_replica: the parameters gathered with
full_tensor()), so that they are the one-process code; each rank evaluates its share of
the validation windows.
"""

import warnings

import torch
from torch import nn

from .model import TransformerLM

QKV_SPLIT = 3  # the packed q, k, v blocks of CausalSelfAttention.qkv


def check_tp_sizes(mconfig, tp):
    """SystemExit unless the model's sizes split over `tp` tensor-parallel ranks."""
    sizes = {"--n-heads": mconfig.n_heads, "--d-model": mconfig.d_model, "the FFN width": mconfig.ffn_width,
             "the vocabulary": mconfig.vocab_size}
    bad = [f"{name} ({value})" for name, value in sizes.items() if value % tp]
    if bad:
        raise SystemExit(f"ab: tensor parallel over {tp} ranks needs {', '.join(bad)} divisible by {tp}")


def mixed_precision(config, env):
    """FSDP2's MixedPrecisionPolicy: bf16 parameters / fp32 reduction when AMP is on (CUDA), else None."""
    if not (config.amp and env.device.type == "cuda"):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def parallelize(model, config, env):
    """Applies env.parallel's tensor parallelism and/or FSDP2 to `model` in place; returns it."""
    if env.uses_tp:
        from ..distributed import STRIDED_SHARD_MIN_TORCH, strided_shard_supported

        if not strided_shard_supported():
            raise SystemExit(f"ab: --parallel {env.parallel} shards the packed qkv (and gated w_gate_up) weights as "
                             f"_StridedShard, which DTensor in torch {torch.__version__} cannot redistribute; use "
                             f"torch >= {'.'.join(map(str, STRIDED_SHARD_MIN_TORCH))}, or --parallel ddp|fsdp")
        check_tp_sizes(model.config, env.tp_world)
        apply_tp(model, env.tp_mesh, replicate_in_bias=env.uses_fsdp)
    if env.uses_fsdp:
        apply_fsdp(model, env.dp_mesh, mixed_precision(config, env), tp=env.uses_tp)
    return model


def apply_fsdp(model, mesh, mp_policy=None, tp=False):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The root returns the logits as nn.Linear makes them (a view of the 2-D GEMM's output);
    # the harness never changes them in place, which is what FSDP2 warns against.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPTransformerLM\) returned a view tensor")

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if tp:
        from ..distributed import fsdp_shard_placement

        kwargs["shard_placement_fn"] = fsdp_shard_placement
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ----------------------------------------------------------------------------- tensor parallel styles
def _styles():
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle
    from torch.distributed.tensor.placement_types import _StridedShard

    def local(outputs):
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    class PackedColwiseParallel(ColwiseParallel):
        """ColwiseParallel for a Linear whose rows are `split` packed blocks ([q; k; v]): weight
        (and bias, unless replicate_bias) _StridedShard(0, split_factor=split), so that rank k holds
        the k-th rows of every block; the output (_StridedShard of the last dim) is returned local."""

        def __init__(self, split, replicate_bias=False):
            super().__init__()
            self.split = split
            self.replicate_bias = replicate_bias

        def _partition_linear_fn(self, name, module, device_mesh):
            for p_name, param in list(module.named_parameters(recurse=False)):
                placement = Replicate() if (p_name == "bias" and self.replicate_bias) \
                    else _StridedShard(0, split_factor=self.split)
                module.register_parameter(p_name, nn.Parameter(
                    distribute_tensor(param.detach(), device_mesh, [placement]), requires_grad=param.requires_grad))

        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            return local(outputs)

    class TiedColwiseParallel(ColwiseParallel):
        """ColwiseParallel that keeps parameters already distributed (a weight tied to a
        RowwiseParallel embedding: both Shard(0) along the vocabulary)."""

        def _partition_linear_fn(self, name, module, device_mesh):
            for p_name, param in list(module.named_parameters(recurse=False)):
                if not isinstance(param, DTensor):
                    module.register_parameter(p_name, nn.Parameter(
                        distribute_tensor(param.detach(), device_mesh, [Shard(0)]),
                        requires_grad=param.requires_grad))

    class ReplicateParallel(ParallelStyle):
        """Parameters Replicate DTensors, plain tensors in and out: every rank computes the same
        (torchtitan's NoParallel). For the norms and the position embedding."""

        def _apply(self, module, device_mesh):
            def input_fn(mod, inputs, mesh):
                return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                             if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

            def output_fn(mod, outputs, mesh):
                if isinstance(outputs, tuple):
                    return tuple(local(t) for t in outputs)
                return local(outputs)

            return distribute_module(module, device_mesh, None, input_fn, output_fn)

    return PackedColwiseParallel, TiedColwiseParallel, ReplicateParallel


def _tp_forward_with_preact(ffn_module, mesh):
    """FFN.forward_with_preact of a tensor-parallel FFN (FFNParallel's hooks run only for
    forward): plain x in, the output all-reduced and the pre-activation gathered out, so
    Block._ffn's telemetry reads the same tensors as in one process."""
    from torch.distributed.tensor import DTensor, Replicate

    method = type(ffn_module).forward_with_preact

    def forward_with_preact(x):
        out, preact = method(ffn_module, DTensor.from_local(x, mesh, [Replicate()], run_check=False))
        return out.redistribute(placements=[Replicate()]).to_local(), preact.detach().full_tensor()

    ffn_module.forward_with_preact = forward_with_preact


def apply_tp(model, mesh, replicate_in_bias=False):
    """The tensor-parallel plan (module docstring) on `mesh` (1-D), in place."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from ..distributed import FFNParallel

    PackedColwiseParallel, TiedColwiseParallel, ReplicateParallel = _styles()
    parallelize_module(model, mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "pos_emb": ReplicateParallel(),
    })
    model.head.weight = model.tok_emb.weight  # re-tie to the distributed parameter
    plan = {"head": TiedColwiseParallel(output_layouts=Replicate())}
    if model.norm_f is not None:
        plan["norm_f"] = ReplicateParallel()
    for i, block in enumerate(model.blocks):
        plan[f"blocks.{i}.attn.qkv"] = PackedColwiseParallel(QKV_SPLIT, replicate_bias=replicate_in_bias)
        plan[f"blocks.{i}.attn.proj"] = RowwiseParallel()
        plan[f"blocks.{i}.norm1"] = ReplicateParallel()
        if block.norm2 is not None:
            plan[f"blocks.{i}.norm2"] = ReplicateParallel()
        plan[f"blocks.{i}.ffn"] = FFNParallel(replicate_in_bias=replicate_in_bias)
    parallelize_module(model, mesh, plan)
    for block in model.blocks:
        _tp_forward_with_preact(block.ffn, mesh)
    return model


# ----------------------------------------------------------------------------- plain replica, gradients
def full(t):
    """The whole tensor of a DTensor (a collective: every rank calls it), t itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def make_replica(mconfig, device):
    """A plain TransformerLM of mconfig (its initialization does not touch the RNG streams of the run)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return TransformerLM(mconfig).to(device)


@torch.no_grad()
def sync_replica(model, replica, grads=False):
    """Copies the (sharded) model's parameters, and with grads=True their gradients, into
    the plain replica. Every rank calls it (the gathers are collectives)."""
    mine = dict(replica.named_parameters())
    for name, param in model.named_parameters():
        target = mine[name]
        target.copy_(full(param.detach()))
        target.grad = full(param.grad.detach()).clone() if grads and param.grad is not None else None
    return replica


def clip_grad_norm_(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_ for DTensor gradients (sharded, replicated or a mix on one
    mesh), as torchtitan does it: the total norm as a plain tensor."""
    from torch.distributed.tensor import DTensor

    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters], 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total
