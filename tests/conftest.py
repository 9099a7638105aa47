"""Shared fixtures. Privileged tests load the real BPF program; with
TCPLIFE_TRACE_REQUIRE_PRIVILEGED=1 (CI, the README test command) a privileged
test that cannot run fails instead of skipping."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

REQUIRE = os.environ.get("TCPLIFE_TRACE_REQUIRE_PRIVILEGED") == "1"


def _why_not_privileged():
    from tcplife_trace.probes.bcc_import import BccMissing, import_bcc
    from tcplife_trace.probes.program import ProgramError, check_privileges
    try:
        check_privileges()
        import_bcc()
    except (ProgramError, BccMissing) as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def privileged():
    why = _why_not_privileged()
    if why:
        if REQUIRE:
            pytest.fail(f"privileged tests are required here but cannot run: {why}")
        pytest.skip(f"privileged test: {why}")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("privileged"):
            item.fixturenames.insert(0, "privileged")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE and report.skipped and item.get_closest_marker("privileged"):
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped, but TCPLIFE_TRACE_REQUIRE_PRIVILEGED=1: {report.longrepr}"
