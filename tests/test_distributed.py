"""ffn on DTensor, FSDP2 and tensor parallelism, on CPU with gloo (ffn.distributed).

The multi-process checks live in tests/dist_worker.py and run in one subprocess
(2 processes, then 4; see its docstring): every op and its backward on DTensor
against the plain op, norms of an x sharded on the normalized dim (redistributed,
as torch's own layer_norm), the refusals of shardings that cannot be computed
locally, and training runs (FSDP2 fp32, FSDP2 bf16 params / fp32 reduce, tensor parallel,
tensor + sequence parallel, and with 4 processes FSDP2 x TP on a 2-D mesh)
compared with the same training in one process. The tests here read its
results; a few cheap checks run in this process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import ffn
from ffn import distributed as fd

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
WORLDS = (2, 4)
FP32_TOL = 2e-5  # relative, losses and first-step gradients: float32 sums in another order
BF16_TOL = 2e-2  # bf16 parameters and activations against the float32 one-process run


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, WORKER, str(out), *map(str, WORLDS)], env=env,
                          capture_output=True, text=True, timeout=600)
    found = {}
    for world in WORLDS:
        path = out / f"world{world}.json"
        if path.exists():
            found[world] = json.loads(path.read_text())
    if proc.returncode != 0 or len(found) != len(WORLDS):
        pytest.fail(f"dist_worker.py failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return found


STRIDED_OK = fd.strided_shard_supported()
NEEDS_STRIDED = pytest.mark.skipif(
    not STRIDED_OK, reason=f"tensor parallel of gated FFNs needs _StridedShard support (torch >= "
                           f"{'.'.join(map(str, fd.STRIDED_SHARD_MIN_TORCH))}); this is torch {torch.__version__}")


def _strided_rejection(check):
    """A check that failed only because this torch's DTensor rejects _StridedShard placements."""
    detail = str(check["detail"])
    return not STRIDED_OK and "_StridedShard" in detail and ("shard_order" in detail or "cannot redistribute" in detail)


def _failures(checks, prefix=None):
    return {k: (v["err"], v["detail"]) for k, v in checks.items()
            if (prefix is None or k.startswith(prefix)) and not v["ok"] and not _strided_rejection(v)}


@pytest.mark.parametrize("world", WORLDS)
def test_ops_on_dtensor(results, world):
    checks = {k: v for k, v in results[world]["checks"].items() if not k.startswith("train/")}
    assert checks, "no op checks ran"
    assert not _failures(checks)


@pytest.mark.parametrize("world", WORLDS)
def test_every_op_checked(results, world):
    """Each op with a strategy was called on DTensors (directly, or as the op autograd runs)."""
    names = {k.split("/")[0] for k in results[world]["checks"]}
    via_autograd = {"_layer_norm_fwd", "_rms_norm_fwd", "_add_layer_norm_fwd", "_gelu_ffn_fwd", "_gated_ffn_fwd",
                    "_layer_norm_bwd", "_rms_norm_bwd", "_gelu_ffn_bwd", "_gated_ffn_bwd",
                    "_gated_activation_bwd", "_bias_gelu_bwd"}
    missing = set(fd.SHARDED_OPS) - names - (via_autograd if world != 2 else set())
    assert not missing


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode, tol", [("fsdp_fp32", FP32_TOL), ("fsdp_bf16", BF16_TOL),
                                       pytest.param("tp", FP32_TOL, marks=NEEDS_STRIDED),
                                       pytest.param("tp_sp", FP32_TOL, marks=NEEDS_STRIDED)])
def test_training_matches_one_process(results, world, mode, tol):
    run = results[world]["losses"].get(mode)
    assert run is not None, _failures(results[world]["checks"], f"train/{mode}") or results[world]["checks"].get(mode)
    assert run["max_rel"] <= tol, run
    assert run["first_step_grad_err"] <= tol, run
    assert results[world]["checks"][f"train/{mode}"]["ok"]


@NEEDS_STRIDED
def test_fsdp_x_tp_2d_matches_one_process(results):
    run = results[4]["losses"].get("fsdp_tp")
    assert run is not None, results[4]["checks"].get("fsdp_tp")
    assert run["max_rel"] <= FP32_TOL and run["first_step_grad_err"] <= FP32_TOL, run


def test_import_is_cheap_and_registers_on_dtensor_import(results):
    info = results[2]["import"]
    assert not info["ffn_loads_dtensor"], "import ffn loaded torch.distributed.tensor"
    assert info["registered_on_dtensor_import"]


def test_every_op_has_a_strategy():
    """Every op of the ffn namespace (public, internal forward, backward) is in SHARDED_OPS, but
    the in-place backward ops (_*_bwd_), which autograd calls on plain tensors only."""
    ops = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("ffn::")}
    in_place = {name for name in ops if name.endswith("_bwd_")}
    assert in_place == {"_layer_norm_bwd_", "_rms_norm_bwd_"}
    assert ops - in_place == set(fd.SHARDED_OPS)


@pytest.mark.parametrize("world", (1, 2, 4))
def test_gate_up_packing(world):
    """Rank k's [gate_k; up_k] blocks: local gated FFNs on them sum to the full one (row-parallel down)."""
    torch.manual_seed(0)
    d, ff = 6, 8
    x = torch.randn(3, d)
    w, b = torch.randn(2 * ff, d), torch.randn(2 * ff)
    w_down = torch.randn(d, ff)
    full = torch.ops.ffn.swiglu(x, w, b, w_down, None)
    parts = sum(
        torch.ops.ffn.swiglu(x, fd.gate_up_shard(w, k, world), fd.gate_up_shard(b, k, world),
                             w_down.chunk(world, dim=1)[k], None)
        for k in range(world)
    )
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)
    packed = fd.interleave_gate_up(w, world)
    assert torch.equal(torch.cat([fd.gate_up_shard(w, k, world) for k in range(world)]), packed)
    assert torch.equal(packed.chunk(world)[world - 1], fd.gate_up_shard(w, world - 1, world))
    assert torch.equal(fd.deinterleave_gate_up(packed, world), w)
    with pytest.raises(ValueError, match="divide"):
        fd.gate_up_shard(torch.randn(2 * 3, d), 0, 2)


def test_module_is_importable_without_process_group():
    assert ffn.distributed is fd
    assert fd.register_sharding_strategies() == fd.SHARDED_OPS  # idempotent
