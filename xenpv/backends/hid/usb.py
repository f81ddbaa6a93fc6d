"""USB HID devices (keyboards, mice, tablets, touch screens) as input sources, through pyusb.

Theory of operation
-------------------
:func:`find_hid_interfaces` lists every interface of class 3 (HID) that pyusb's backend
(libusb on a real host; any :class:`usb.backend.IBackend`) shows.  A
:class:`UsbHidSource` serves one of them:

1. **open** (blocking, run in a thread): detach the kernel driver if one is bound (it
   is re-attached at close), select configuration 1 if the device is unconfigured,
   claim the interface, ``SET_IDLE(0)`` (report only on change) and, for a boot-class
   interface, ``SET_PROTOCOL(report)`` -- a device that stalls either request is fine
   (both are optional in HID 1.11) --, read the HID class descriptor from the interface's
   extra descriptors for the report descriptor's length (bounded by
   :data:`~xenpv.protocols.hid.MAX_DESCRIPTOR`), ``GET_DESCRIPTOR(report)`` and parse it
   (:func:`~xenpv.protocols.hid.parse_report_descriptor`: not only the boot protocol).
2. **events**: interrupt-IN reads of at most ``wMaxPacketSize`` bytes, each in a worker
   thread with a short timeout so :meth:`close` is noticed; every report goes through
   :class:`~xenpv.protocols.hid.HidTranslator` into
   :mod:`~xenpv.backends.hid.source` events (absolute axes keep the device's logical
   range; the keyboard backend scales them to its ``width``/``height``).
3. **end**: the device gone (``ENODEV``, hot-unplug) ends the iteration cleanly; a bad
   report (undeclared ID, too short, or a transfer larger than the endpoint allows) is
   counted and skipped; :data:`MAX_ERRORS` consecutive failures end the source with
   :attr:`UsbHidSource.error` set.  Work per report is bounded by the descriptor bounds.

The code is the same for a real device and for the emulated devices of
:mod:`xenpv.testing.usbhid`: only the pyusb backend differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as _errno
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import usb.core
import usb.util

from xenpv.backends.hid.source import AbsInput, InputEvent, KeyInput, RelInput, TouchInput
from xenpv.errors import LocalError
from xenpv.protocols.hid import (
    MAX_DESCRIPTOR,
    HidError,
    HidTranslator,
    ReportDescriptor,
    Translated,
    parse_report_descriptor,
)

__all__ = ["MAX_ERRORS", "HidInterface", "UsbHidSource", "find_hid_interfaces"]

log = logging.getLogger(__name__)

HID_CLASS = 3
#: Consecutive failed reads or bad reports that end a source.
MAX_ERRORS = 16
_GET_DESCRIPTOR, _SET_IDLE, _SET_PROTOCOL = 0x06, 0x0A, 0x0B
_DT_HID, _DT_REPORT = 0x21, 0x22
_IN_STD_INTERFACE = 0x81  # device-to-host, standard, interface
_OUT_CLASS_INTERFACE = 0x21  # host-to-device, class, interface


@dataclass(frozen=True)
class HidInterface:
    """One HID interface of a USB device (what :func:`find_hid_interfaces` lists)."""

    device: Any  # usb.core.Device
    interface: int
    subclass: int
    protocol: int

    @property
    def name(self) -> str:
        """``usb-<bus>-<address>:<interface>`` (or vendor:product when there is no bus)."""
        d = self.device
        where = f"{d.bus}-{d.address}" if d.bus is not None else f"{d.idVendor:04x}:{d.idProduct:04x}"
        return f"usb-{where}:{self.interface}"

    @property
    def kind(self) -> str:
        """``keyboard``/``mouse`` for boot interfaces, else ``hid``."""
        return {1: "keyboard", 2: "mouse"}.get(self.protocol, "hid") if self.subclass == 1 \
            else "hid"


def find_hid_interfaces(backend: Any = None) -> list[HidInterface]:
    """Every HID interface of configuration 1 of every device ``backend`` shows."""
    out = []
    try:
        devices = list(usb.core.find(find_all=True, backend=backend) or [])
    except usb.core.NoBackendError:
        raise LocalError("pyusb found no USB library (libusb) on this host") from None
    for dev in devices:
        try:
            cfg = dev[0]
        except (usb.core.USBError, IndexError):
            continue
        for intf in cfg:
            if intf.bInterfaceClass == HID_CLASS and intf.bAlternateSetting == 0:
                out.append(HidInterface(dev, intf.bInterfaceNumber, intf.bInterfaceSubClass,
                                        intf.bInterfaceProtocol))
    return out


def _hid_report_length(extra: Any) -> int:
    """``wDescriptorLength`` of the report descriptor in a HID class descriptor."""
    data = bytes(extra or b"")
    i = 0
    while i + 2 <= len(data):
        length, kind = data[i], data[i + 1]
        if length < 2:
            break
        if kind == _DT_HID and length >= 9 and i + length <= len(data):
            count = data[i + 5]
            for k in range(count):
                at = i + 6 + 3 * k
                if at + 3 <= i + length and data[at] == _DT_REPORT:
                    return int.from_bytes(data[at + 1 : at + 3], "little")
        i += length
    raise HidError("no HID class descriptor naming a report descriptor")


def _event(t: Translated) -> InputEvent:
    kind = t[0]
    if kind == "key":
        return KeyInput(int(t[1]), bool(t[2]))  # type: ignore[call-overload]
    if kind == "rel":
        return RelInput(*(int(v) for v in t[1:4]))  # type: ignore[call-overload]
    if kind == "abs":
        return AbsInput(*(int(v) for v in t[1:6]))  # type: ignore[call-overload]
    x, y, xm, ym = (int(v) for v in t[3:7])  # type: ignore[call-overload]
    return TouchInput(str(t[1]), int(t[2]), x=x, y=y, x_max=xm, y_max=ym)  # type: ignore[call-overload]


class UsbHidSource:
    """One HID interface as an :class:`~xenpv.backends.hid.source.InputSource`.

    ``read_timeout_ms`` bounds each interrupt read (and so how soon :meth:`close` is
    seen).  Counters in :attr:`stats`: ``reports``, ``events``, ``bad_reports``,
    ``read_errors``, ``timeouts``.
    """

    def __init__(self, hid: HidInterface, *, read_timeout_ms: int = 100) -> None:
        """Prepare; :meth:`open` claims the interface."""
        self.hid = hid
        self.name = hid.name
        self.read_timeout_ms = read_timeout_ms
        self.descriptor: ReportDescriptor | None = None
        self.translator: HidTranslator | None = None
        #: Why the source ended early (None: still running or ended by unplug/close).
        self.error: str | None = None
        self.unplugged = False
        self.stats = {"reports": 0, "events": 0, "bad_reports": 0, "read_errors": 0,
                      "timeouts": 0}
        self._endpoint: Any = None
        self._detached = False
        self._claimed = False
        self._closed = False
        self._lock = threading.Lock()  # a read in flight finishes before the release

    # -- open
    async def open(self) -> UsbHidSource:
        """Claim the interface and read the report descriptor (see the module docstring).

        Raises :class:`HidError` for a hostile descriptor and :class:`LocalError` when
        the device cannot be used; nothing stays claimed then."""
        try:
            await asyncio.to_thread(self._open)
        except BaseException:
            await asyncio.to_thread(self._release)
            raise
        return self

    def _open(self) -> None:
        dev, number = self.hid.device, self.hid.interface
        try:
            with contextlib.suppress(NotImplementedError):
                if dev.is_kernel_driver_active(number):
                    dev.detach_kernel_driver(number)
                    self._detached = True
            try:
                cfg = dev.get_active_configuration()
            except usb.core.USBError:
                dev.set_configuration()
                cfg = dev.get_active_configuration()
            intf = cfg[(number, 0)]
            usb.util.claim_interface(dev, number)
            self._claimed = True
            self._optional(_SET_IDLE, 0)
            if self.hid.subclass == 1:
                self._optional(_SET_PROTOCOL, 1)  # report protocol, not boot
            length = _hid_report_length(intf.extra_descriptors)
            if not 0 < length <= MAX_DESCRIPTOR:
                raise HidError(f"report descriptor length {length} (1..{MAX_DESCRIPTOR})")
            raw = dev.ctrl_transfer(_IN_STD_INTERFACE, _GET_DESCRIPTOR, _DT_REPORT << 8,
                                    number, length, self.read_timeout_ms * 10)
            self.descriptor = parse_report_descriptor(bytes(raw))
            self.translator = HidTranslator(self.descriptor)
            eps = [e for e in intf if usb.util.endpoint_direction(e.bEndpointAddress)
                   == usb.util.ENDPOINT_IN and usb.util.endpoint_type(e.bmAttributes)
                   == usb.util.ENDPOINT_TYPE_INTR]
            if not eps:
                raise HidError("no interrupt-IN endpoint")
            self._endpoint = eps[0]
        except usb.core.USBError as exc:
            raise LocalError(f"{self.name}: cannot open: {exc}") from None

    def _optional(self, request: int, value: int) -> None:
        try:
            self.hid.device.ctrl_transfer(_OUT_CLASS_INTERFACE, request, value,
                                          self.hid.interface, None, self.read_timeout_ms * 10)
        except usb.core.USBError as exc:
            if exc.errno == _errno.ENODEV:
                raise
            log.debug("%s: optional request %#x refused: %s", self.name, request, exc)

    # -- events
    async def events(self) -> AsyncIterator[InputEvent]:
        """The device's events; ends at unplug, :meth:`close`, or after
        :data:`MAX_ERRORS` consecutive failures (then :attr:`error` says why)."""
        if self.translator is None or self._endpoint is None:
            raise LocalError(f"{self.name}: not open")
        failures = 0
        size = int(self._endpoint.wMaxPacketSize)
        while not self._closed:
            outcome = await asyncio.to_thread(self._read, size)
            if outcome is None:
                continue  # timeout: look at _closed again
            if isinstance(outcome, str):
                if outcome == "gone":
                    self.unplugged = True
                    return
                failures += 1
                if failures >= MAX_ERRORS:
                    self.error = f"{MAX_ERRORS} consecutive failures, last: {outcome}"
                    log.warning("%s: %s", self.name, self.error)
                    return
                continue
            try:
                translated = self.translator.translate(outcome)
            except HidError as exc:
                self.stats["bad_reports"] += 1
                failures += 1
                if failures >= MAX_ERRORS:
                    self.error = f"{MAX_ERRORS} consecutive bad reports, last: {exc}"
                    return
                continue
            failures = 0
            self.stats["reports"] += 1
            for t in translated:
                self.stats["events"] += 1
                yield _event(t)

    def _read(self, size: int) -> bytes | str | None:
        """One interrupt read: the report, None on timeout, or a failure description
        (``"gone"`` when the device was unplugged)."""
        with self._lock:
            if self._closed:
                return None
            return self._read_locked(size)

    def _read_locked(self, size: int) -> bytes | str | None:
        try:
            data = self._endpoint.read(size, self.read_timeout_ms)
        except usb.core.USBTimeoutError:
            self.stats["timeouts"] += 1
            return None
        except usb.core.USBError as exc:
            if exc.errno == _errno.ENODEV:
                return "gone"
            self.stats["read_errors"] += 1
            return str(exc)
        except (ValueError, AttributeError) as exc:  # released under our feet at close
            return f"closed: {exc}"
        return bytes(data)

    # -- close
    async def close(self) -> None:
        """End the events and give the interface back (to the kernel driver if it had
        one); idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        dev, number = self.hid.device, self.hid.interface
        if self._claimed:
            self._claimed = False
            with contextlib.suppress(usb.core.USBError):
                usb.util.release_interface(dev, number)
        if self._detached and not self.unplugged:
            self._detached = False
            with contextlib.suppress(usb.core.USBError, NotImplementedError):
                dev.attach_kernel_driver(number)
        with contextlib.suppress(usb.core.USBError):
            usb.util.dispose_resources(dev)
