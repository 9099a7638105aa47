from tcplife_trace.analysis.summary import StateTimes


def test_exact_percentiles_below_cap():
    st = StateTimes()
    for i in range(1, 101):
        st.add(1, i * 1_000_000)
    (row,) = st.table()
    assert row["state"] == "ESTABLISHED" and row["count"] == 100
    assert (row["p50_ms"], row["p90_ms"], row["p99_ms"], row["max_ms"]) == (51.0, 91.0, 100.0, 100.0)


def test_reservoir_beyond_cap_keeps_count_max_and_shape():
    st = StateTimes(exact=1000, reservoir=500)
    for i in range(20_000):
        st.add(8, (i % 1000) * 1_000_000)
    st.add(8, 5_000 * 1_000_000)
    (row,) = st.table()
    assert row["count"] == 20_001 and row["max_ms"] == 5000.0
    assert 400 <= row["p50_ms"] <= 600  # uniform 0..999 ms


def test_exact_up_to_the_cap_the_readme_states():
    """The README's "exact up to N samples per state" is the code's cap, and it holds at N."""
    import os
    import random
    import re
    from tcplife_trace.analysis import summary
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    m = re.search(r"exact up to ([\d,]+)\s+samples per state, a uniform reservoir of ([\d,]+) beyond", readme)
    assert m, "the README no longer states the cap"
    assert int(m.group(1).replace(",", "")) == summary.EXACT
    assert int(m.group(2).replace(",", "")) == summary.RESERVOIR
    values = list(range(1, summary.EXACT + 1))
    random.Random(1).shuffle(values)
    st = StateTimes()
    for v in values:
        st.add(1, v * 1000)
    (row,) = st.table()
    n = summary.EXACT
    assert row["count"] == n and row["max_ms"] == n / 1000
    for p, key in ((0.5, "p50_ms"), (0.9, "p90_ms"), (0.99, "p99_ms")):
        assert row[key] == (int(p * n) + 1) / 1000  # nearest rank over every sample
