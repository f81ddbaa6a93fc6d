"""Rule-based state machines of the fuzz package (ring indexes against the io/ring.h model)."""

from __future__ import annotations

from hypothesis import settings

from xenpv.fuzz.machines import RingIndexMachine

RingIndexMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestRingIndexes = RingIndexMachine.TestCase
