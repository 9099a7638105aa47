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


def test_add_many_keeps_the_exact_samples_then_a_uniform_reservoir():
    """StateTimes.add_many (the folded records' time in state, a column at a time): the exact
    samples are add()'s, in order; past them the reservoir is a uniform sample of every value
    given (counted, the max exact), by add_many's blocks and add()'s steps alike."""
    import numpy as np
    a, b = StateTimes(exact=1000, reservoir=500), StateTimes(exact=1000, reservoir=500)
    first = np.arange(10, 1010, dtype=np.int64)[::-1]
    for v in first.tolist():
        a.add(3, v)
    b.add_many(3, first[:400])
    b.add_many(3, first[400:])
    assert list(a._exact[3]) == list(b._exact[3]) and a.table() == b.table()
    n = 2_000_000
    values = np.arange(n, dtype=np.int64)
    for chunk in np.array_split(values, 613):
        b.add_many(3, chunk)
    for v in range(n, n + 2000):  # and one at a time after the blocks
        b.add(3, v)
    res = np.array(b._res[3])
    assert b._count[3] == 1000 + n + 2000 and b._max[3] == n + 1999
    assert len(res) == 500 and len(set(res.tolist())) == 500 and res.min() >= 0
    # uniform over the 2 M values: a quarter below n/4, the mean near n/2 (500 samples: +-10%)
    assert 0.18 < (res < n / 4).mean() < 0.32
    assert 0.9 < res.mean() / (n / 2) < 1.1
    assert (res >= n).sum() <= 5  # the last 2000 of 2 M: about 0.5 expected
