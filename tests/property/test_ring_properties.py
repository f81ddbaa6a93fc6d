"""Properties of the rings under random interleavings of both ends (both implementations).

* Every request comes out of the ring exactly once, in order, with its bytes intact; the
  same for responses.
* No lost wake-up: once a consumer's final check said "sleep" (False), the producer's next
  push that carries anything returns notify=True.
* Byte rings: what the reader gets is exactly the prefix of what the writer got accepted.
"""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rings_conftest import MASK32, PAGE, pattern, rings_fixture  # noqa: F401

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
starts = st.one_of(st.just(0), st.integers(MASK32 - 200, MASK32), st.integers(0, MASK32))
steps = st.lists(st.tuples(st.sampled_from(["produce", "consume", "respond", "complete",
                                            "sleep_back", "sleep_front"]),
                           st.integers(0, 40)), min_size=1, max_size=80)


@SETTINGS
@given(slot=st.sampled_from([8, 12, 64, 112]), start=starts, plan=steps)
def test_entries_flow_in_order_exactly_once_and_wakeups_are_never_lost(
        rings: SimpleNamespace, slot: int, start: int, plan: list[tuple[str, int]]) -> None:
    page = bytearray(PAGE)
    front = rings.FrontRing(page, slot, start)
    back = rings.BackRing(page, slot, start)
    sent: list[bytes] = []
    received: list[bytes] = []
    answered: list[bytes] = []
    completed: list[bytes] = []
    back_asleep = front_asleep = False
    for step, (action, k) in enumerate(plan):
        if action == "produce":
            k = min(k, front.free_requests())
            entries = [pattern(len(sent) + j, slot) for j in range(k)]
            front.put_requests(b"".join(entries))
            sent += entries
            notify = front.push_requests_and_check_notify()
            if back_asleep and k:
                assert notify, f"step {step}: lost wake-up of the backend"
                back_asleep = False
        elif action == "consume":
            data = back.take_requests(k)
            received += [data[i : i + slot] for i in range(0, len(data), slot)]
        elif action == "respond":
            k = min(k, back.pending_responses())
            entries = [pattern(1000 + len(answered) + j, slot) for j in range(k)]
            back.put_responses(b"".join(entries))
            answered += entries
            notify = back.push_responses_and_check_notify()
            if front_asleep and k:
                assert notify, f"step {step}: lost wake-up of the frontend"
                front_asleep = False
        elif action == "complete":
            data = front.take_responses(k)
            completed += [data[i : i + slot] for i in range(0, len(data), slot)]
        elif action == "sleep_back":
            back_asleep = not back.final_check_for_requests()
        else:
            front_asleep = not front.final_check_for_responses()
        assert received == sent[: len(received)]
        assert completed == answered[: len(completed)]
        assert back.unconsumed_requests() == len(sent) - len(received)
        assert front.unconsumed_responses() == len(answered) - len(completed)
        assert front.free_requests() == front.nr_ents - (len(sent) - len(completed))


@SETTINGS
@given(size=st.sampled_from([1024, 2048, 4096]), start=starts,
       plan=st.lists(st.tuples(st.booleans(), st.integers(0, 5000)), min_size=1, max_size=40))
def test_byte_stream_is_delivered_exactly(rings: SimpleNamespace, size: int, start: int,
                                          plan: list[tuple[bool, int]]) -> None:
    buf = bytearray(size + 64)
    words = memoryview(buf).cast("I")
    words[0] = words[1] = start
    layout = {"data_offset": 64, "size": size, "prod_offset": 0, "cons_offset": 4}
    writer = rings.ByteRing(buf, **layout)
    reader = rings.ByteRing(buf, **layout)
    stream = pattern(start & 0xFF, 200_000)
    written = 0
    got = bytearray()
    for is_write, n in plan:
        if is_write:
            free = writer.free()
            accepted = writer.write(stream[written : written + n])
            assert accepted == min(n, free)
            written += accepted
        else:
            got += reader.read(n)
        assert bytes(got) == stream[: len(got)]
        assert reader.available() == written - len(got)
    got += reader.read()
    assert bytes(got) == stream[:written]
