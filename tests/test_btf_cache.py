"""The BTF offset cache in /run: every value checked before it reaches the BPF program's text,
and what the offsets read checked on the tracer's own connection at start."""
import json
import os

import pytest

from tcplife_trace.probes import btf, offset_check

TRUE_OFFSETS, _ = btf.kernel_offsets(use_cache=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("TCPLIFE_TRACE_CACHE", str(d))
    return d


def plant(offsets, notes=(), key=None):
    """Write a cache entry for this kernel (its real key unless told otherwise); returns its path."""
    k = key or btf.cache_key(os.stat(btf.VMLINUX_BTF))
    path = btf._cache_path(btf.cache_key(os.stat(btf.VMLINUX_BTF)))
    with open(path, "w") as f:
        json.dump({"key": k, "offsets": offsets, "notes": list(notes)}, f)
    os.chmod(path, 0o600)
    return path


def test_a_clean_cache_is_used_as_written(cache):
    assert TRUE_OFFSETS  # this machine has BTF
    first = btf.kernel_offsets()
    assert first == (TRUE_OFFSETS, []) and len(os.listdir(cache)) == 1
    assert btf.kernel_offsets() == first


@pytest.mark.parametrize("planted,why", [
    ({"OFF_SK_UID": "528\n#error planted"}, "OFF_SK_UID is '528\\n#error planted'"),
    ({"OFF_SK_UID": 528.5}, "not an offset"),
    ({"OFF_SK_UID": True}, "not an offset"),
    ({"OFF_SK_UID": -8}, "not an offset"),
    ({"OFF_SK_UID": 1 << 20}, "not an offset"),
    ({"OFF_SK_UID 0\n#include </etc/shadow>\n#define X": 1}, "unknown field"),
])
def test_bad_cached_values_never_reach_the_program(cache, planted, why):
    plant({**TRUE_OFFSETS, **planted})
    offsets, notes = btf.kernel_offsets()
    assert offsets == TRUE_OFFSETS  # read again from BTF
    assert len(notes) == 1 and "was not used" in notes[0] and why in notes[0], notes
    assert btf.kernel_offsets() == (TRUE_OFFSETS, [])  # and the cache mended


def test_an_entry_for_another_kernel_build_is_not_used(cache):
    key = {**btf.cache_key(os.stat(btf.VMLINUX_BTF)), "build_id": "00" * 20}
    plant({k: v + 8 for k, v in TRUE_OFFSETS.items()}, key=key)
    offsets, notes = btf.kernel_offsets()
    assert offsets == TRUE_OFFSETS and "key differs" in notes[0]


def test_a_cache_others_can_write_is_not_trusted(cache):
    path = plant({k: v + 8 for k, v in TRUE_OFFSETS.items()})
    os.chmod(cache, 0o777)
    offsets, notes = btf.kernel_offsets()
    assert offsets == TRUE_OFFSETS and "not writable by group or others" in notes[0]
    assert json.load(open(path))["offsets"] != TRUE_OFFSETS  # nothing written into such a place


def test_the_build_id_is_read_from_the_kernel_notes():
    bid = btf.build_id()
    assert bid is None or (len(bid) in (40, 64) and int(bid, 16) >= 0)


@pytest.mark.privileged
def test_planted_text_is_not_in_the_program(cache):
    from tcplife_trace.probes import program as prog
    from tcplife_trace.probes import tracefs
    plant({**TRUE_OFFSETS, "OFF_SK_UID": "528\n#error planted"})
    src = prog.build_source(prog.Settings(), tracefs.find_tracefs())
    assert "planted" not in src.text and f"#define OFF_SK_UID {TRUE_OFFSETS['OFF_SK_UID']}\n" in src.text
    assert any("was not used" in n for n in src.notices)


@pytest.mark.privileged
@pytest.mark.parametrize("family", [None, 6])
def test_planted_wrong_offsets_are_caught_at_start_and_rebuilt(cache, family):
    """Integers in range under the right key, but wrong: the start-up check on the tracer's own
    connection sees a wrong netns, uid and byte counts, rebuilds from BTF and says so."""
    from tcplife_trace.live import LiveSession
    from tcplife_trace.probes import program as prog
    from tcplife_trace.probes.filters import Filters
    wrong = {k: v + 8 for k, v in TRUE_OFFSETS.items()}
    plant(wrong)
    s = LiveSession(prog.Settings(Filters(family=family)))
    try:
        said = [n for n in s.notices if "BTF offset cache" in n]
        assert len(said) == 1 and "read wrong values" in said[0] and "rebuilt from" in said[0], s.notices
        assert btf.kernel_offsets() == (TRUE_OFFSETS, [])  # the cache holds the kernel's own now
        others, problem, mine, _ = offset_check.check(s.stream, set(TRUE_OFFSETS), family)
        assert problem is None and mine  # the program now loaded reads right
    finally:
        s.stop()


@pytest.mark.privileged
def test_under_a_filter_wrong_offsets_are_caught_against_the_btf(cache):
    from tcplife_trace.live import LiveSession
    from tcplife_trace.probes import program as prog
    from tcplife_trace.probes.filters import Filters
    plant({k: v + 8 for k, v in TRUE_OFFSETS.items()})
    s = LiveSession(prog.Settings(Filters(lports=(1,))))  # hides the tracer's own connection
    try:
        assert any("differ from the kernel's BTF" in n for n in s.notices), s.notices
        assert btf.kernel_offsets() == (TRUE_OFFSETS, [])
    finally:
        s.stop()


@pytest.mark.privileged
def test_right_offsets_start_without_a_notice(cache):
    from tcplife_trace.live import LiveSession
    btf.kernel_offsets()
    s = LiveSession()
    try:
        assert not [n for n in s.notices if "offset" in n], s.notices
    finally:
        s.stop()
