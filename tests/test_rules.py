"""analysis/rules.py is the one home of the TCP vocabularies and small rules; the BPF program
spells the same rules in C. These tests hold the C equal to rules.py by parsing ebpf/event.h
and ebpf/tcplife.bpf.c (no kernel needed), and check that every Python path takes them from
rules.py."""
import itertools
import os
import re

from tcplife_trace import ebpf
from tcplife_trace.analysis import end_rules, lifecycle, rules
from tcplife_trace.probes import event_layout
from tcplife_trace.probes.event_layout import XFlag
from tcplife_trace.probes.tcp_states import TcpState as S

HEADER = open(ebpf.EVENT_HEADER).read()
PROGRAM = open(ebpf.PROGRAM).read()
STATES = [int(s) for s in S]


def _defines(prefix: str) -> dict[str, int]:
    return {m[0]: int(m[1], 0) for m in re.findall(rf"#define {prefix}(\w+)\s+(0x[0-9a-fA-F]+|\d+)", HEADER)}


def _function(name: str) -> str:
    """The body of a C function of the BPF program (from its name to the closing brace at column 0)."""
    m = re.search(rf"\b{name}\([^)]*\)\s*\{{(.*?)\n\}}", PROGRAM, re.S)
    assert m, f"{name} not found in {ebpf.PROGRAM}"
    return m[1]


def _c_condition(cond: str):
    """A C condition over old/new and TCP_* state names as a Python function of (old, new)."""
    expr = cond.replace("&&", " and ").replace("||", " or ").replace("!", " not ")
    expr = re.sub(r"\bTCP_(\w+)\b", lambda m: str(int(S[m[1]])), expr)
    code = compile(expr, "<bpf condition>", "eval")
    return lambda old, new: eval(code, {}, {"old": old, "new": new})


def test_owner_sources_and_roles_are_the_kernels_codes():
    sources = {k.lower(): v for k, v in _defines("TLT_SRC_").items()}
    assert sources == {s: i for i, s in enumerate(rules.OWNER_SOURCES)}
    assert rules.SRC_NONE == sources["none"]
    roles = {k.lower(): v for k, v in _defines("TLT_ROLE_").items()}
    assert roles == {r: i for i, r in enumerate(rules.KERNEL_ROLES)}
    assert set(rules.KERNEL_ROLES) == set(rules.ROLES)
    # the TIME_WAIT note the kernel sets on an event
    assert _defines("TLT_X_")["TIME_WAIT"] == XFlag.TIME_WAIT


def test_bpf_guess_role_is_rules_guess_role():
    body = _function("guess_role")
    branches = re.findall(r"if \((.*?)\)\s*return TLT_ROLE_(\w+);", body, re.S)
    assert [r.lower() for _, r in branches] == [r for r, _ in rules.ROLE_HINTS]
    tests = [(r.lower(), _c_condition(c)) for c, r in branches]
    for old, new in itertools.product(STATES, STATES):
        kernel = next((r for r, t in tests if t(old, new)), "unknown")
        assert kernel == rules.guess_role(old, new, "unknown"), (S(old).name, S(new).name)


def test_bpf_acting_transitions_and_births_are_rules():
    """agg_transition: which transitions make the current task the owner, by which source,
    and which one takes the listener's owner (the passive birth)."""
    body = _function("agg_transition")
    acting = {}
    for cond, what in re.findall(r"if \(((?:[^{}])*?)\)\s*\{\s*(agg_owner\(a, tgid, TLT_SRC_\w+\)|x \|= agg_listener)",
                                 body, re.S):
        pairs = [(int(S[a]), int(S[b])) for a, b in re.findall(r"old == TCP_(\w+) && new == TCP_(\w+)", cond)]
        assert pairs, cond
        source = re.search(r"TLT_SRC_(\w+)", what)[1].lower() if "agg_owner" in what else "listener"
        acting.update(dict.fromkeys(pairs, source))
    passive = [p for p, s in acting.items() if s == "listener"]
    assert passive == [p for p, role in rules.BIRTHS.items() if role == "passive"]
    assert {p: s for p, s in acting.items() if s != "listener"} == rules.ACTING
    assert {p for p, s in rules.ACTING.items() if s == "close"} == rules.CLOSERS
    assert {p: r for p, r in rules.BIRTHS.items() if r != "passive"} == \
        {p: {"connect": "active", "listen": "listener"}[s] for p, s in rules.ACTING.items() if s != "close"}


def test_bpf_time_wait_rule_is_rules():
    m = re.search(r"if \(new == TCP_CLOSE && \((.*?)\) && !\(a->lflags & TLT_L_RST_RECEIVED\)\)\s*"
                  r"x \|= TLT_X_TIME_WAIT;", PROGRAM, re.S)
    assert m, "the TIME_WAIT rule of agg_transition"
    states = tuple(int(S[s]) for s in re.findall(r"old == TCP_(\w+)", m[1]))
    assert states == rules.TIME_WAIT_FROM
    for before, rst in itertools.product(STATES, (False, True)):
        assert rules.enters_time_wait(before, rst) == (before in states and not rst)
        assert bool(rules.time_wait_from(before)) == (before in states)
    # end_rules calls the same CLOSE "active_close ... TIME_WAIT"
    for before in STATES:
        reason, detail, _ = end_rules.classify(end_rules.Ends(False, False, before, False, -1, False, -1))
        assert (reason == "active_close") == (before in states), S(before).name


def test_every_path_takes_the_vocabularies_from_rules():
    """One object each, not copies: the Tracker, the event layout, the frames and end_rules."""
    from tcplife_trace.frames import filters as recorded_filters
    from tcplife_trace.frames import lifecycles as lifecycle_frame
    from tcplife_trace.frames import schema as frame_schema
    assert lifecycle.OWNER_SOURCES is rules.OWNER_SOURCES is event_layout.OWNER_SOURCE_NAMES
    assert event_layout.ROLE_NAMES is rules.KERNEL_ROLES
    assert lifecycle.ROLES is rules.ROLES and lifecycle.BIRTHS is rules.BIRTHS
    assert lifecycle.END_REASONS is rules.END_REASONS is end_rules.END_REASONS
    assert recorded_filters.ACTING is rules.ACTING
    assert lifecycle_frame.SOURCES == list(rules.OWNER_SOURCES)
    assert lifecycle_frame.ROLE_CATEGORIES == list(rules.ROLES)
    assert frame_schema.END_REASONS is rules.END_REASONS
    for path in ("analysis/lifecycle.py", "tcplife_trace/frames/lifecycles.py", "tcplife_trace/frames/filters.py",
                 "probes/event_layout.py", "analysis/end_rules.py"):
        text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)).read()
        assert '"connect", "listen", "io"' not in text, path
        assert "S.FIN_WAIT2), int(S.CLOSING)" not in text, path
