"""scripts/profile_step.py runs (smoke size) and attributes the ffn ops' time to them."""

from script_loader import load_script


def test_quick_profile_names_the_ffn_ops(capsys):
    profile_step = load_script("profile_step")
    assert profile_step.main(["--quick", "--impls", "torch,ffn", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    headers = [line.split()[0] for line in out.splitlines() if line and not line.startswith((" ", "#"))]
    assert headers == ["sublayer", "sublayer", "step", "step"]  # designs A and B of each workload
    ffn_lines = [line for line in out.splitlines() if line.strip().startswith("ffn ")]
    torch_lines = [line for line in out.splitlines() if line.strip().startswith("torch ")]
    assert len(ffn_lines) == len(torch_lines) == 4
    assert all(" ffn " in line for line in ffn_lines) and not any(" ffn " in line for line in torch_lines)


def test_kinds():
    kind_of = load_script("profile_step").kind_of
    assert [kind_of(n) for n in ("ffn::_rms_norm_fwd", "aten::mm", "aten::addmm", "aten::native_layer_norm",
                                 "aten::silu_backward", "aten::add_", "aten::_foreach_mul_",
                                 "graph_0_cpp_fused_add_0")] == \
        ["ffn", "gemm", "gemm", "norm", "activation", "elementwise", "optimizer", "inductor"]
