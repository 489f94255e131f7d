"""The class decisions at and around their thresholds (grokedge.experiments.universality)."""

from __future__ import annotations

import math

import pytest
import torch

from grokedge.experiments.universality import (
    CLASS_CODES,
    COMPRESSION,
    FUNCTIONAL,
    MIXED,
    UNDETERMINED,
    ClassThresholds,
    functional_epsilon,
    late_indices,
    late_mean,
    late_median,
    observed_class,
    predicted_class,
)

T = ClassThresholds()  # 0.90 / 0.90, 0.50 / 0.30 / 12°, balance 2 / 0.5
TINY = 1e-9


def test_paper_values_land_in_the_papers_classes() -> None:
    assert observed_class(0.87, 18.0, 0.80).name == MIXED  # Dyck
    assert observed_class(0.02, 8.0, 0.04).name == COMPRESSION  # SCAN
    assert observed_class(0.97, 30.0, 0.95).name == FUNCTIONAL  # "high, moderate, high"


@pytest.mark.parametrize(
    "share,r2,want",
    [
        (0.90, 0.90, FUNCTIONAL),  # both exactly at the thresholds
        (0.90 - TINY, 0.90, MIXED),
        (0.90, 0.90 - TINY, MIXED),
        (1.0, 1.0, FUNCTIONAL),
    ],
)
def test_functional_threshold(share: float, r2: float, want: str) -> None:
    assert observed_class(share, 20.0, r2, T).name == want


@pytest.mark.parametrize(
    "share,rotation,r2,want",
    [
        (0.50, 12.0, 0.30, COMPRESSION),  # all three exactly at the thresholds
        (0.50 + TINY, 12.0, 0.30, MIXED),
        (0.50, 12.0 + TINY, 0.30, MIXED),
        (0.50, 12.0, 0.30 + TINY, MIXED),
        (0.0, 0.0, -0.5, COMPRESSION),  # R² can be negative
    ],
)
def test_compression_threshold(share: float, rotation: float, r2: float, want: str) -> None:
    assert observed_class(share, rotation, r2, T).name == want


def test_missing_measurements() -> None:
    d = observed_class(0.95, 20.0, math.nan)
    assert d.name == FUNCTIONAL and d.criteria == ("grad_share", "rotation_deg")
    d = observed_class(0.1, math.nan, 0.1)
    assert d.name == COMPRESSION and d.criteria == ("grad_share", "functional_r2")
    d = observed_class(math.nan, 10.0, 0.1)
    assert d.name == UNDETERMINED and math.isnan(d.code)
    no_rotation = ClassThresholds(compression_rotation_deg=None)
    assert observed_class(0.1, 80.0, 0.1, no_rotation).name == COMPRESSION
    assert observed_class(0.1, 80.0, 0.1, T).name == MIXED


@pytest.mark.parametrize(
    "b,want",
    [
        (2.0, FUNCTIONAL),
        (2.0 - TINY, MIXED),
        (math.inf, FUNCTIONAL),
        (0.5, COMPRESSION),
        (0.5 + TINY, MIXED),
        (1.0, MIXED),
        (-3.0, COMPRESSION),  # gradient driving closes the gap
        (-math.inf, COMPRESSION),
        (math.nan, UNDETERMINED),
    ],
)
def test_predicted_class_thresholds(b: float, want: str) -> None:
    assert predicted_class(b, T).name == want


def test_codes_and_custom_thresholds() -> None:
    assert [CLASS_CODES[c] for c in (FUNCTIONAL, MIXED, COMPRESSION)] == [0, 1, 2]
    assert observed_class(0.87, 18.0, 0.80).code == 1.0
    loose = ClassThresholds(functional_grad_share=0.8, functional_r2=0.75)
    assert observed_class(0.87, 18.0, 0.80, loose).name == FUNCTIONAL
    assert predicted_class(1.5, ClassThresholds(functional_balance=1.5)).name == FUNCTIONAL
    with pytest.raises(ValueError, match="compression_grad_share"):
        ClassThresholds(compression_grad_share=0.95)
    with pytest.raises(ValueError, match="compression_r2"):
        ClassThresholds(compression_r2=0.95)
    with pytest.raises(ValueError, match="compression_balance"):
        ClassThresholds(compression_balance=3.0)


def test_late_windows_and_statistics() -> None:
    phases = ["pre", "at", "post", "late", "late", "late", "late"]
    idx, basis = late_indices(phases, min_late=3, tail=2)
    assert (idx, basis) == ([3, 4, 5, 6], "phase")
    idx, basis = late_indices(phases[:5], min_late=3, tail=2)  # only 2 late: the tail
    assert (idx, basis) == ([3, 4], "tail")
    assert late_indices(["pre"], 3, 10) == ([0], "tail")
    values = [9.0, 9.0, 9.0, 1.0, math.nan, 3.0, 2.0]
    assert late_mean(values, [3, 4, 5, 6]) == pytest.approx(2.0)
    assert late_median(values, [3, 4, 5, 6]) == 2.0
    assert late_median([1.0, math.inf, 5.0, 2.0], [0, 1, 2, 3]) == 3.5
    assert math.isnan(late_mean([math.nan], [0])) and math.isnan(late_median([], []))


def test_functional_epsilon_is_the_papers_fraction() -> None:
    theta = torch.tensor([3.0, 4.0])
    assert functional_epsilon(theta) == pytest.approx(0.005 * 5.0)
    assert functional_epsilon(theta, 0.01) == pytest.approx(0.05)


def test_margins_reproduce_the_decision_and_name_the_decisive_thresholds() -> None:
    from grokedge.experiments.universality import (
        OBSERVED_RULES,
        PREDICTED_RULES,
        class_from_margins,
        decisive_thresholds,
        threshold_margins,
    )

    t = ClassThresholds()
    grid = [
        (s, rot, r2)
        for s in (0.02, 0.5, 0.87, 0.95)
        for rot in (8.0, 18.0)
        for r2 in (0.04, 0.8, 0.95)
    ]
    for share, rot, r2 in grid:
        m = threshold_margins(share, rot, r2, 1.0, t)
        assert class_from_margins(m, OBSERVED_RULES) == observed_class(share, rot, r2, t).name
    # Dyck's paper numbers: mixed, failing both functional criteria (share 0.03 short, R²
    # 0.10 short) and two of compression's: no single threshold changes the class.
    dyck = threshold_margins(0.87, 18.0, 0.80, 1.0, t)
    assert dyck["functional_grad_share"] == pytest.approx(-0.03)
    assert decisive_thresholds(dyck, OBSERVED_RULES) == []
    # Share 0.87 with R² 0.95: the share threshold alone decides, 0.03 away.
    m = threshold_margins(0.87, 18.0, 0.95, 1.0, t)
    assert decisive_thresholds(m, OBSERVED_RULES) == [
        ("functional_grad_share", pytest.approx(-0.03))
    ]
    # SCAN's numbers: compression, and each of its three criteria alone would make it mixed.
    scan = threshold_margins(0.02, 8.0, 0.04, 1.0, t)
    assert decisive_thresholds(scan, OBSERVED_RULES) == [
        ("compression_grad_share", pytest.approx(0.48)),
        ("compression_r2", pytest.approx(0.26)),
        ("compression_rotation_deg", pytest.approx(4.0)),
    ]
    # Predicted: balance 1.0 is mixed, 1.0 under functional's threshold, 0.5 over compression's.
    assert decisive_thresholds(dyck, PREDICTED_RULES) == [
        ("functional_balance", pytest.approx(-1.0)),
        ("compression_balance", pytest.approx(-0.5)),
    ]
