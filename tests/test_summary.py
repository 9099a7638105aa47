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
