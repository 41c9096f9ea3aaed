"""The package as a user imports it: what `import ffn` loads, the op defaults, the activation table."""

import subprocess
import sys

import pytest
import torch

import ffn
from ffn.activations import ACTIVATIONS, GATED_OPS
from ffn.schema import op_default


def test_import_ffn_loads_no_harness_and_no_plotting_or_logging_library():
    # Against what `import torch` loads by itself (it imports tqdm when tqdm is installed).
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import ffn\n"
        "new = set(sys.modules) - before\n"
        "bad = sorted(m for m in new if m.startswith('ffn.harness') or m == 'ffn.ab'\n"
        "             or m.split('.')[0] in ('matplotlib', 'tensorboard', 'tqdm'))\n"
        "print(','.join(bad) or 'clean', 'ffn.modules' in new)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["clean", "True"]


def test_op_defaults_come_from_the_schemas():
    assert op_default("layer_norm", "eps") == 1e-5 and op_default("rms_norm", "eps") == 1e-6
    assert op_default("gelu_ffn", "approximate") == "none"
    assert ffn.LayerNorm(4).eps == op_default("layer_norm", "eps") == torch.nn.LayerNorm(4).eps
    assert ffn.reference.rms_norm.__defaults__[-3:] == (op_default("rms_norm", "eps"), 0.0, False)
    assert op_default("add_rms_norm", "weight_offset") == op_default("layer_norm", "weight_offset") == 0.0
    assert op_default("geglu", "approximate") == "none"
    with pytest.raises(KeyError, match="no argument 'eps'"):
        op_default("swiglu", "eps")


def test_fused_op_of_each_activation():
    from ffn.activations import approximate_of, fused_op

    assert {name: (fused_op(name, True), fused_op(name, False), approximate_of(name)) for name in ACTIVATIONS} == {
        "silu": ("swiglu", None, "none"), "gelu": ("geglu", "gelu_ffn", "none"),
        "gelu_tanh": ("geglu", "gelu_ffn", "tanh"), "relu": ("reglu", "relu_ffn", "none")}
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_op("swish", True)


def test_activation_table_covers_every_gated_op_and_module():
    assert GATED_OPS == {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
    for op, activation in GATED_OPS.items():
        assert hasattr(torch.ops.ffn, op) and hasattr(ffn.reference, op)
        assert ffn.modules.FFN_MODULES[op].op == op and ffn.modules.FFN_MODULES[op](4, 3).activation == activation
    x = torch.linspace(-3, 3, 13)
    for name, spec in ACTIVATIONS.items():
        gate_up = torch.cat([x, torch.ones_like(x)])
        torch.testing.assert_close(torch.ops.ffn.gated_activation(gate_up, name), spec.fn(x))
    with pytest.raises(ValueError, match="activation must be one of"):
        ffn.activations.activation("tanh")
