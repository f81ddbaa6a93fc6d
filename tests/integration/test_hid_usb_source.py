"""The USB HID source through pyusb, on emulated devices (xenpv.testing.usbhid).

The source code under test is the one a real device meets; only pyusb's backend is the
emulated one (these machines have no USB).  Hostile devices: malformed descriptors,
oversized reports, undeclared report IDs, stalls, disconnects mid-transfer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from xenpv.backends.hid.source import AbsInput, KeyInput, RelInput, TouchInput
from xenpv.backends.hid.usb import MAX_ERRORS, UsbHidSource, find_hid_interfaces
from xenpv.errors import LocalError
from xenpv.protocols.hid import HidError
from xenpv.protocols.keycodes import BTN_LEFT, NAMES
from xenpv.testing.usbhid import (
    EmulatedHidDevice,
    EmulatedUsbBackend,
    boot_keyboard,
    tablet,
    touch_screen,
    wheel_mouse,
)

WAIT = 5.0


def run(coro: Any) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(60):
            return await coro

    return asyncio.run(main())


async def opened(dev: EmulatedHidDevice) -> tuple[UsbHidSource, EmulatedUsbBackend]:
    backend = EmulatedUsbBackend([dev])
    (hid,) = find_hid_interfaces(backend)
    return await UsbHidSource(hid, read_timeout_ms=20).open(), backend


async def take(src: UsbHidSource, n: int) -> list[Any]:
    it = src.events()
    out = [await asyncio.wait_for(it.__anext__(), WAIT) for _ in range(n)]
    await it.aclose()
    return out


async def ends(src: UsbHidSource) -> list[Any]:
    """Everything until the iteration ends."""
    out = []
    async with asyncio.timeout(WAIT):
        async for ev in src.events():
            out.append(ev)
    return out


def test_enumeration_finds_the_four_kinds() -> None:
    devs = [boot_keyboard(), wheel_mouse(address=3), tablet(address=4), touch_screen(address=5)]
    found = find_hid_interfaces(EmulatedUsbBackend(devs))
    assert [(h.name, h.kind) for h in found] == [
        ("usb-1-2:0", "keyboard"), ("usb-1-3:0", "mouse"), ("usb-1-4:0", "hid"),
        ("usb-1-5:0", "hid")]


def test_open_detaches_the_kernel_driver_claims_and_configures_and_close_gives_back() -> None:
    async def body() -> None:
        kbd = boot_keyboard()
        src, backend = await opened(kbd)
        assert not kbd.kernel_driver and kbd.claimed and kbd.configured == 1
        assert kbd.idle == 0 and kbd.protocol_mode == 1  # SET_IDLE(0), SET_PROTOCOL(report)
        assert (0x81, 0x06, 0x2200, 0, 63) in kbd.controls  # GET_DESCRIPTOR(report)
        await src.close()
        await src.close()
        assert kbd.kernel_driver and not kbd.claimed and backend.open_handles == 0

    run(body())


def test_optional_requests_may_stall() -> None:
    async def body() -> None:
        kbd = boot_keyboard()
        kbd.stall_requests = {0x0A, 0x0B}
        src, _ = await opened(kbd)
        kbd.send(bytes([0, 0, 0x04, 0, 0, 0, 0, 0]))
        assert await take(src, 1) == [KeyInput(NAMES["A"], True)]
        await src.close()

    run(body())


def test_each_device_kind_translates_its_reports() -> None:
    async def body() -> None:
        kbd, mouse, tab, touch = boot_keyboard(), wheel_mouse(), tablet(), touch_screen()
        kbd.send(bytes([0x20, 0, 0x1E, 0, 0, 0, 0, 0]), bytes(8))  # right shift + "1"
        mouse.send(bytes([1, 3, 0xFE, 0]), bytes([0, 0, 0, 1]))
        tab.send(bytes([0, 0x00, 0x40, 0xFF, 0x7F, 0]))
        touch.send(bytes([1, 3, 9, 0x10, 0, 0x20, 0]) + bytes(6) + bytes([1]))
        expected = {
            "keyboard": [KeyInput(NAMES["RIGHTSHIFT"], True), KeyInput(NAMES["1"], True),
                         KeyInput(NAMES["1"], False), KeyInput(NAMES["RIGHTSHIFT"], False)],
            "mouse": [KeyInput(BTN_LEFT, True), RelInput(3, -2, 0), KeyInput(BTN_LEFT, False),
                      RelInput(0, 0, -1)],
            "tablet": [AbsInput(0x4000, 0x7FFF, 0x7FFF, 0x7FFF, 0)],
            "touch": [TouchInput("down", 0, x=16, y=32, x_max=4095, y_max=4095),
                      TouchInput("frame", 0)],
        }
        for dev in (kbd, mouse, tab, touch):
            src, _ = await opened(dev)
            assert await take(src, len(expected[dev.name])) == expected[dev.name], dev.name
            await src.close()

    run(body())


def test_hot_unplug_is_a_clean_end() -> None:
    async def body() -> None:
        mouse = wheel_mouse()
        src, backend = await opened(mouse)
        mouse.send(bytes([0, 1, 1, 0]))
        mouse.unplug(mid_transfer=True)
        assert await ends(src) == [RelInput(1, 1, 0)]
        assert src.unplugged and src.error is None
        await src.close()
        assert backend.open_handles == 0 and not mouse.kernel_driver  # nothing to give back

    run(body())


def test_unplug_while_waiting_for_a_report_ends_the_source() -> None:
    async def body() -> None:
        kbd = boot_keyboard()
        src, _ = await opened(kbd)

        async def later() -> None:
            await asyncio.sleep(0.05)
            kbd.unplug()

        task = asyncio.create_task(later())
        assert await ends(src) == []
        await task
        assert src.unplugged
        await src.close()

    run(body())


def test_hostile_reports_are_counted_and_skipped() -> None:
    async def body() -> None:
        touch = touch_screen()
        src, _ = await opened(touch)
        touch.send(bytes([7]) + bytes(13))  # undeclared report ID
        touch.send(bytes([1, 1]))  # shorter than declared
        touch.babble()  # longer than the transfer allows
        touch.send(bytes(65))  # longer than wMaxPacketSize: babble too
        touch.stall()
        touch.send(bytes([1, 1, 5, 1, 0, 1, 0]) + bytes(6) + bytes([1]))
        got = await take(src, 2)
        assert got == [TouchInput("down", 0, x=1, y=1, x_max=4095, y_max=4095),
                       TouchInput("frame", 0)]
        assert src.stats["bad_reports"] == 2 and src.stats["read_errors"] == 3
        await src.close()

    run(body())


def test_a_device_that_only_sends_garbage_ends_with_an_error() -> None:
    async def body() -> None:
        kbd = boot_keyboard()
        src, _ = await opened(kbd)
        kbd.send(*[bytes(3)] * (MAX_ERRORS + 5))
        assert await ends(src) == []
        assert src.error is not None and "consecutive" in src.error
        await src.close()
        assert kbd.kernel_driver

    run(body())


MALFORMED = {
    "unclosed collection": bytes.fromhex("05010906a101 7508 9501 8102"),
    "truncated item": bytes.fromhex("0501 0906 a101 0507 19"),
    "no input": bytes.fromhex("05010906a101c0"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_report_descriptor_refuses_the_device_and_gives_it_back(name: str) -> None:
    async def body() -> None:
        dev = EmulatedHidDevice("bad", MALFORMED[name])
        backend = EmulatedUsbBackend([dev])
        (hid,) = find_hid_interfaces(backend)
        with pytest.raises(HidError):
            await UsbHidSource(hid).open()
        assert dev.kernel_driver and not dev.claimed and backend.open_handles == 0

    run(body())


@pytest.mark.parametrize("declared", [0, 5000, 0xFFFF])
def test_report_descriptor_length_out_of_bounds(declared: int) -> None:
    async def body() -> None:
        dev = boot_keyboard(declared_length=declared)
        backend = EmulatedUsbBackend([dev])
        (hid,) = find_hid_interfaces(backend)
        with pytest.raises(HidError, match="length"):
            await UsbHidSource(hid).open()
        assert dev.kernel_driver and not dev.claimed

    run(body())


def test_device_gone_before_open_is_a_local_error() -> None:
    async def body() -> None:
        dev = boot_keyboard()
        backend = EmulatedUsbBackend([dev])
        (hid,) = find_hid_interfaces(backend)
        dev.unplug()
        with pytest.raises(LocalError):
            await UsbHidSource(hid).open()

    run(body())
