"""Input sources for the keyboard backend, and the focus router.

* :mod:`.source`: the events a source produces (:class:`KeyInput`, :class:`RelInput`,
  :class:`AbsInput`, :class:`TouchInput`), the :class:`InputSource` interface and the
  programmatic source;
* :mod:`.usb`: USB HID devices through pyusb (report descriptors parsed by
  :mod:`xenpv.protocols.hid`);
* :mod:`.router`: one set of sources, several guests, input only to the foreground one.
"""

from xenpv.backends.hid.source import (
    AbsInput,
    InputEvent,
    InputSource,
    KeyInput,
    ProgrammaticSource,
    RelInput,
    TouchInput,
)

__all__ = [
    "AbsInput",
    "InputEvent",
    "InputSource",
    "KeyInput",
    "ProgrammaticSource",
    "RelInput",
    "TouchInput",
]
