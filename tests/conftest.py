"""What every test area needs: hypothesis profiles, the ``device`` fixture and the ``cuda``
marker's rule. Plain helpers are in tests/helpers.py (``from helpers import ...``); each
area's own fixtures are in its folder's conftest.py.

Areas: ops/ (the custom ops, one file per op), fisher/ (estimators), groups/ (GroupLayout
builders), adaptune/ (FisherAdapTune), selection/ (TR-PTS selection, MaskedOptimizer,
SparseLinear), vit/ (token prune-merge hook), adapters/ (LoRFA / VeFA), distributed/ (DDP,
FSDP2 on gloo), demo/, integrations/ (transformers, peft; CI's integration stage), and
test_package.py (the package as a whole).

Hypothesis profiles: ``ci`` (the default: few, derandomized examples so CI is reproducible) and
``dev`` (many random examples). Pick one with ``HYPOTHESIS_PROFILE=dev pytest tests``.

Sweeps: a test over a registry it did not write (timm's models, transformers' auto mappings,
every ``torch.optim`` optimizer) records each case's outcome with the ``sweep`` fixture
(``sweep("timm families", name, "verified" | "refused")``); the counts per sweep are printed
at the end of the run, for the README's integration table.

Markers (declared in pyproject.toml): ``cuda`` on every test that needs a CUDA device, so that
``pytest -m cuda`` runs exactly those and ``pytest -m "not cuda"`` the rest; ``slow``.
"""
from __future__ import annotations

import collections
import os

import pytest
from hypothesis import HealthCheck, settings

from helpers import CUDA_SKIP_REASON, devices

# ---------------------------------------------------------------------------------------------
# Hypothesis profiles

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ---------------------------------------------------------------------------------------------
# Devices


@pytest.fixture(params=devices)
def device(request) -> str:
    """Each device the ops can run on here (for non-hypothesis tests)."""
    return request.param


def pytest_collection_modifyitems(config, items):
    """Refuse a test that is skipped for want of CUDA (``helpers.requires_cuda``) but lacks the
    ``cuda`` marker: ``-m cuda`` would miss it on a GPU machine and ``-m "not cuda"`` would
    run (and skip) it on a CPU one."""
    unmarked = [item.nodeid for item in items
                if item.get_closest_marker("cuda") is None
                and any(m.kwargs.get("reason") == CUDA_SKIP_REASON
                        for m in item.iter_markers("skipif"))]
    if unmarked:
        raise pytest.UsageError("tests skipped without CUDA must be marked @pytest.mark.cuda: "
                                + ", ".join(unmarked))


# ---------------------------------------------------------------------------------------------
# Sweeps over registries we did not write: outcome counts, printed at the end of the run

_SWEEP_OUTCOMES = ("verified", "refused")
_sweeps: "collections.defaultdict[str, dict]" = collections.defaultdict(dict)


@pytest.fixture
def sweep():
    """``sweep(kind, case, outcome)`` records that ``case`` of the sweep ``kind`` was
    ``"verified"`` (agreed with its oracle) or ``"refused"`` (a clear error at patch or
    construction time, its message checked by the test). A case recorded twice keeps its last
    outcome, so parametrised variants of one case count once."""
    def record(kind: str, case: str, outcome: str) -> None:
        if outcome not in _SWEEP_OUTCOMES:
            raise ValueError(f"sweep outcome must be one of {_SWEEP_OUTCOMES}, got {outcome!r}")
        _sweeps[kind][case] = outcome
    return record


def pytest_terminal_summary(terminalreporter):
    if not _sweeps:
        return
    terminalreporter.section("sweeps over external registries")
    for kind in sorted(_sweeps):
        outcomes = collections.Counter(_sweeps[kind].values())
        terminalreporter.line(
            f"{kind}: {len(_sweeps[kind])} tried, {outcomes['verified']} verified, "
            f"{outcomes['refused']} refused")
