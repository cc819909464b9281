"""`embedjax.bench.timing.interleaved_seconds`: every call once per round, in order."""
from embedjax.bench.timing import interleaved_seconds


def test_interleaved_seconds_runs_each_call_once_per_round_in_order():
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = interleaved_seconds(calls, rounds=4)
    assert order == ["a", "b", "c"] * 4  # round-robin, not a's rounds then b's
    assert list(times) == ["a", "b", "c"]
    assert all(len(t) == 4 and all(s >= 0.0 for s in t) for t in times.values())
