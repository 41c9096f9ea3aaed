"""The design grammar of --designs."""

import pytest

from ffn.harness import designs
from ffn.harness.designs import Design

def test_design_grammar():
    assert designs.parse_design("A") == Design(norm="layernorm", ffn="gelu")
    assert designs.parse_design("B") == Design(norm="rmsnorm", ffn="swiglu")
    assert designs.parse_design("B+recenter") == Design(norm="layernorm", ffn="swiglu", norm_bias=False)
    assert designs.parse_design("rms+gelu+bias+post+parallel+shift=1.5") == Design(
        norm="rmsnorm", ffn="gelu", norm_bias=True, placement="post", layout="parallel", mean_shift=1.5)
    base = Design(placement="post", mean_shift=2.0)
    assert designs.parse_design("ln+reglu", base) == Design(norm="layernorm", ffn="reglu", placement="post",
                                                            mean_shift=2.0)
    assert designs.describe(designs.parse_design("B+recenter")) == "ln+swiglu+nobias"
    assert designs.describe(designs.parse_design("B+bias+shift=1")) == "rms+swiglu+bias+shift=1"
    for bad in ("C", "rms", "gelu", "B+shift=x", ""):
        with pytest.raises(ValueError):
            designs.parse_design(bad)
    with pytest.raises(ValueError, match="twice"):
        designs.parse_designs("A,B,A")
