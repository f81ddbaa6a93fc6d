"""Emulated USB HID devices behind pyusb's pluggable backend interface (for tests).

These machines have no USB host controller, so the USB HID source
(:mod:`xenpv.backends.hid.usb`) is exercised through :class:`EmulatedUsbBackend`, a
:class:`usb.backend.IBackend` whose devices answer at the transfer level: device,
configuration, interface (with the HID class descriptor), endpoint and string
descriptors; the standard and HID class control requests (``GET_DESCRIPTOR`` for the
report descriptor, ``SET_IDLE``, ``SET_PROTOCOL``, ``GET_PROTOCOL``); interrupt-IN
transfers served from a queue the test fills; stalls (``EPIPE``), babble (a report longer
than the transfer: ``EOVERFLOW``), timeouts and disconnects (``ENODEV`` from then on,
also in the middle of a transfer); a kernel driver bound to each interface until it is
detached (claiming before that fails with ``EBUSY``, as libusb does on Linux).

Report descriptors of the four devices (:func:`boot_keyboard`, :func:`wheel_mouse`,
:func:`tablet`, :func:`touch_screen`) are written here from published ones:

* the keyboard of the HID 1.11 specification's Appendix E.6 (modifier byte, reserved
  byte, five LEDs out, six-key array, usages 0 … 101), boot subclass/protocol 1;
* the mouse of Appendix E.10 (three buttons, relative X/Y) with a relative wheel, the
  common shape of USB wheel mice, boot subclass/protocol 2;
* a tablet in the shape of QEMU's ``usb-tablet`` (three buttons, 16-bit absolute X/Y in
  0 … 0x7fff, relative wheel);
* a two-finger touch screen in the layout of Microsoft's published multi-touch sample
  descriptor (Digitizer/Touch Screen application, report ID 1, per finger a logical
  Finger collection with tip switch, in range, contact identifier and 12-bit X/Y, then a
  contact count; a feature report ID 2 with the contact count maximum).
"""

from __future__ import annotations

import array
import errno
import threading
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import usb.backend
import usb.core

__all__ = [
    "EmulatedHidDevice",
    "EmulatedUsbBackend",
    "boot_keyboard",
    "tablet",
    "touch_screen",
    "wheel_mouse",
]

KEYBOARD_REPORT = bytes.fromhex(
    "05010906a101"            # Generic Desktop / Keyboard / Application
    "0507 19e0 29e7 1500 2501 7501 9508 8102"  # modifiers: 8 x 1 bit, variable
    "9501 7508 8101"          # reserved byte (constant)
    "9505 7501 0508 1901 2905 9102"  # five LEDs (output)
    "9501 7503 9101"          # LED padding
    "9506 7508 1500 2565 0507 1900 2965 8100"  # six-key array, usages 0..101
    "c0".replace(" ", ""))
MOUSE_REPORT = bytes.fromhex(
    "05010902a1010901a100"    # Generic Desktop / Mouse / Application / Pointer / Physical
    "0509 1901 2903 1500 2501 9503 7501 8102"  # three buttons
    "9501 7505 8101"          # padding
    "0501 0930 0931 0938 1581 257f 7508 9503 8106"  # X, Y, wheel: relative
    "c0c0".replace(" ", ""))
TABLET_REPORT = bytes.fromhex(
    "05010902a1010901a100"
    "0509 1901 2903 1500 2501 9503 7501 8102"
    "9501 7505 8101"
    "0501 0930 0931 1500 26ff7f 3500 46ff7f 7510 9502 8102"  # X, Y absolute 0..0x7fff
    "0501 0938 1581 257f 3500 4500 7508 9501 8106"  # wheel relative
    "c0c0".replace(" ", ""))
_FINGER = (
    "0922 a102"                                   # Finger, logical collection
    "0942 1500 2501 7501 9501 8102"               # tip switch
    "0932 8102"                                   # in range
    "9506 8103"                                   # padding
    "257f 7508 9501 0951 8102"                    # contact identifier
    "0501 26ff0f 7510 9502 0930 0931 8102"        # X, Y absolute 0..4095
    "050d c0")
TOUCH_REPORT = bytes.fromhex((
    "050d 0904 a101 8501"                         # Digitizer / Touch Screen / App, ID 1
    + _FINGER + _FINGER
    + "0954 257f 9501 7508 8102"                  # contact count
    + "8502 0955 2502 b102"                       # feature ID 2: contact count maximum
    + "c0").replace(" ", ""))


@dataclass
class EmulatedHidDevice:
    """One emulated HID device (one configuration, one HID interface, one interrupt-IN
    endpoint).  Tests queue reports with :meth:`send` and events with :meth:`stall`,
    :meth:`babble`, :meth:`unplug`."""

    name: str
    report_descriptor: bytes
    vendor: int = 0x1209
    product: int = 0x0001
    subclass: int = 0
    protocol: int = 0
    max_packet: int = 8
    interval: int = 10
    #: what the HID class descriptor claims as the report descriptor's length
    declared_length: int | None = None
    kernel_driver: bool = True
    bus: int = 1
    address: int = 2
    #: control requests seen: (bmRequestType, bRequest, wValue, wIndex, length)
    controls: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    stall_requests: set[int] = field(default_factory=set)
    configured: int = 0
    claimed: bool = False
    protocol_mode: int = 1
    idle: int | None = None
    gone: bool = False
    _queue: deque[bytes | str] = field(default_factory=deque)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def send(self, *reports: bytes) -> None:
        """Queue interrupt-IN reports."""
        with self._cond:
            self._queue.extend(reports)
            self._cond.notify_all()

    def stall(self) -> None:
        """The next interrupt transfer stalls (``EPIPE``)."""
        self._control_item("stall")

    def babble(self) -> None:
        """The next transfer is longer than asked (``EOVERFLOW``)."""
        self._control_item("babble")

    def unplug(self, *, mid_transfer: bool = False) -> None:
        """Disconnect now, or (``mid_transfer``) when the next transfer is under way."""
        if mid_transfer:
            self._control_item("unplug")
            return
        with self._cond:
            self.gone = True
            self._cond.notify_all()

    def _control_item(self, what: str) -> None:
        with self._cond:
            self._queue.append(what)
            self._cond.notify_all()

    def hid_descriptor(self) -> bytes:
        """The HID class descriptor (bcdHID 1.11, one report descriptor)."""
        n = len(self.report_descriptor) if self.declared_length is None else self.declared_length
        return bytes([9, 0x21, 0x11, 0x01, 0, 1, 0x22]) + n.to_bytes(2, "little")

    # -- transfers (called by the backend)
    def interrupt_in(self, size: int, timeout_ms: int) -> bytes:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._queue or self.gone, timeout_ms / 1000)
            if self.gone:
                raise _error(errno.ENODEV)
            if not ok:
                raise usb.core.USBTimeoutError("Operation timed out", -7, errno.ETIMEDOUT)
            item = self._queue.popleft()
        if item == "stall":
            raise _error(errno.EPIPE)
        if item == "babble":
            raise _error(errno.EOVERFLOW)
        if item == "unplug":
            self.gone = True
            raise _error(errno.ENODEV)
        data = item.encode() if isinstance(item, str) else bytes(item)
        if len(data) > size:
            raise _error(errno.EOVERFLOW)
        return data

    def control(self, rtype: int, request: int, value: int, index: int, length: int,
                out: bytes) -> bytes:
        if self.gone:
            raise _error(errno.ENODEV)
        self.controls.append((rtype, request, value, index, length))
        if request in self.stall_requests:
            raise _error(errno.EPIPE)
        if rtype == 0x81 and request == 0x06 and value >> 8 == 0x22 and index == 0:
            return self.report_descriptor[:length]
        if rtype == 0x81 and request == 0x06 and value >> 8 == 0x21 and index == 0:
            return self.hid_descriptor()[:length]
        if rtype == 0x21 and request == 0x0A and index == 0:
            self.idle = value >> 8
            return b""
        if rtype == 0x21 and request == 0x0B and index == 0:
            self.protocol_mode = value
            return b""
        if rtype == 0xA1 and request == 0x03 and index == 0:
            return bytes([self.protocol_mode])[:length]
        if rtype == 0x80 and request == 0x06 and value >> 8 == 0x03:  # strings
            if value & 0xFF == 0:
                return bytes([4, 3, 0x09, 0x04])[:length]
            text = self.name.encode("utf-16-le")
            return (bytes([2 + len(text), 3]) + text)[:length]
        raise _error(errno.EPIPE)  # anything else: a request error (stall)


def _error(code: int) -> usb.core.USBError:
    return usb.core.USBError(errno.errorcode.get(code, str(code)), -code, code)


def boot_keyboard(**kw: Any) -> EmulatedHidDevice:
    """The HID 1.11 Appendix E.6 keyboard (boot interface)."""
    return EmulatedHidDevice("keyboard", KEYBOARD_REPORT, product=0x0001, subclass=1,
                             protocol=1, max_packet=8, **kw)


def wheel_mouse(**kw: Any) -> EmulatedHidDevice:
    """The Appendix E.10 mouse with a wheel (boot interface)."""
    return EmulatedHidDevice("mouse", MOUSE_REPORT, product=0x0002, subclass=1, protocol=2,
                             max_packet=4, **kw)


def tablet(**kw: Any) -> EmulatedHidDevice:
    """A tablet shaped like QEMU's usb-tablet (absolute X/Y 0 … 0x7fff)."""
    return EmulatedHidDevice("tablet", TABLET_REPORT, product=0x0003, max_packet=8, **kw)


def touch_screen(**kw: Any) -> EmulatedHidDevice:
    """A two-finger touch screen (report ID 1, 12-bit X/Y)."""
    return EmulatedHidDevice("touch", TOUCH_REPORT, product=0x0004, max_packet=64, **kw)


class EmulatedUsbBackend(usb.backend.IBackend):
    """pyusb backend serving :class:`EmulatedHidDevice` objects (``usb.core.find(…,
    backend=EmulatedUsbBackend([...]))``)."""

    def __init__(self, devices: list[EmulatedHidDevice]) -> None:
        """Serve ``devices`` (a device unplugged is no longer enumerated)."""
        self.devices = list(devices)
        self.open_handles = 0

    def enumerate_devices(self) -> Any:
        return iter([d for d in self.devices if not d.gone])

    def get_device_descriptor(self, dev: EmulatedHidDevice) -> Any:
        return SimpleNamespace(
            bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0, bDeviceSubClass=0,
            bDeviceProtocol=0, bMaxPacketSize0=64, idVendor=dev.vendor, idProduct=dev.product,
            bcdDevice=0x0100, iManufacturer=0, iProduct=1, iSerialNumber=0,
            bNumConfigurations=1, address=dev.address, bus=dev.bus, port_number=1,
            port_numbers=(1,), speed=2)

    def get_configuration_descriptor(self, dev: EmulatedHidDevice, config: int) -> Any:
        if config != 0:
            raise IndexError(config)
        return SimpleNamespace(
            bLength=9, bDescriptorType=2, wTotalLength=34, bNumInterfaces=1,
            bConfigurationValue=1, iConfiguration=0, bmAttributes=0xA0, bMaxPower=50,
            extra_descriptors=array.array("B"))

    def get_interface_descriptor(self, dev: EmulatedHidDevice, intf: int, alt: int,
                                 config: int) -> Any:
        if (intf, alt, config) != (0, 0, 0):
            raise IndexError(intf)
        return SimpleNamespace(
            bLength=9, bDescriptorType=4, bInterfaceNumber=0, bAlternateSetting=0,
            bNumEndpoints=1, bInterfaceClass=3, bInterfaceSubClass=dev.subclass,
            bInterfaceProtocol=dev.protocol, iInterface=0,
            extra_descriptors=array.array("B", dev.hid_descriptor()))

    def get_endpoint_descriptor(self, dev: EmulatedHidDevice, ep: int, intf: int, alt: int,
                                config: int) -> Any:
        if (ep, intf, alt, config) != (0, 0, 0, 0):
            raise IndexError(ep)
        return SimpleNamespace(
            bLength=7, bDescriptorType=5, bEndpointAddress=0x81, bmAttributes=3,
            wMaxPacketSize=dev.max_packet, bInterval=dev.interval, bRefresh=0,
            bSynchAddress=0, extra_descriptors=array.array("B"))

    def open_device(self, dev: EmulatedHidDevice) -> EmulatedHidDevice:
        if dev.gone:
            raise _error(errno.ENODEV)
        self.open_handles += 1
        return dev

    def close_device(self, dev_handle: EmulatedHidDevice) -> None:
        self.open_handles -= 1

    def set_configuration(self, dev_handle: EmulatedHidDevice, config_value: int) -> None:
        if dev_handle.gone:
            raise _error(errno.ENODEV)
        dev_handle.configured = config_value

    def get_configuration(self, dev_handle: EmulatedHidDevice) -> int:
        if dev_handle.gone:
            raise _error(errno.ENODEV)
        return dev_handle.configured

    def set_interface_altsetting(self, dev_handle: EmulatedHidDevice, intf: int,
                                 altsetting: int) -> None:
        if dev_handle.gone:
            raise _error(errno.ENODEV)

    def claim_interface(self, dev_handle: EmulatedHidDevice, intf: int) -> None:
        if dev_handle.gone:
            raise _error(errno.ENODEV)
        if dev_handle.kernel_driver:
            raise _error(errno.EBUSY)
        dev_handle.claimed = True

    def release_interface(self, dev_handle: EmulatedHidDevice, intf: int) -> None:
        dev_handle.claimed = False

    def intr_read(self, dev_handle: EmulatedHidDevice, ep: int, intf: int, buff: Any,
                  timeout: int) -> int:
        if not dev_handle.claimed:
            raise _error(errno.EBUSY)
        data = dev_handle.interrupt_in(len(buff), timeout)
        buff[: len(data)] = array.array("B", data)
        return len(data)

    def ctrl_transfer(self, dev_handle: EmulatedHidDevice, bmRequestType: int, bRequest: int,
                      wValue: int, wIndex: int, data: Any, timeout: int) -> int:
        length = len(data) if data is not None else 0
        out = bytes(data) if bmRequestType & 0x80 == 0 and data is not None else b""
        reply = dev_handle.control(bmRequestType, bRequest, wValue, wIndex, length, out)
        if bmRequestType & 0x80:
            data[: len(reply)] = array.array("B", reply)
            return len(reply)
        return length

    def clear_halt(self, dev_handle: EmulatedHidDevice, ep: int) -> None:
        pass

    def reset_device(self, dev_handle: EmulatedHidDevice) -> None:
        pass

    def is_kernel_driver_active(self, dev_handle: EmulatedHidDevice, intf: int) -> bool:
        return dev_handle.kernel_driver

    def detach_kernel_driver(self, dev_handle: EmulatedHidDevice, intf: int) -> None:
        dev_handle.kernel_driver = False

    def attach_kernel_driver(self, dev_handle: EmulatedHidDevice, intf: int) -> None:
        dev_handle.kernel_driver = True
