"""Training metrics: the paired telemetry overhead."""

import pytest

from ffn.harness.metrics import paired_overhead

def test_paired_telemetry_overhead():
    times = [9.0, 1.0, 1.5, 1.0, 1.0, 2.0, 1.0, 1.0, 1.5, 1.0]
    flags = [True, False, True, False, False, True, False, False, True, False]
    # telemetry steps 2, 5, 8 against their neighbours: 1.5/1, 2/1, 1.5/1 -> median 1.5
    assert paired_overhead(times, flags, skip=1) == pytest.approx(0.5)
    assert paired_overhead(times, [False] * 10) is None
