"""The report's declarative configs in ``conf/report/``, read once and cached.

- ``paper.yaml``: the paper's numbers the report sets beside its own;
- ``verdicts.yaml``: every threshold a verdict uses;
- ``claims.yaml``: the table of the paper's claims (title, paper value, measurement, rule).

None of them is a Hydra config of a training run: the report reads the files directly
from the installed ``grokedge.conf`` package.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml

CONF_PACKAGE = "grokedge.conf"
REPORT_CONF_DIR = "report"


@cache
def report_yaml(name: str) -> Any:
    """The parsed ``conf/report/<name>`` (e.g. ``"verdicts.yaml"``), cached per name."""
    text = resources.files(CONF_PACKAGE).joinpath(REPORT_CONF_DIR, name).read_text("utf-8")
    return yaml.safe_load(text)


def verdict_thresholds() -> dict[str, Any]:
    """The parsed ``conf/report/verdicts.yaml`` (blocks ``event_timing``, ``claims`` and
    ``indicators``)."""
    return report_yaml("verdicts.yaml")


def indicator_settings() -> dict[str, Any]:
    """The ``indicators`` block of ``conf/report/verdicts.yaml``: the change-point search
    (:mod:`grokedge.reporting.change_points`), the indicator bench's verdict thresholds
    (:mod:`grokedge.reporting.indicator_rule`) and the indicators' order and labels."""
    return verdict_thresholds()["indicators"]
