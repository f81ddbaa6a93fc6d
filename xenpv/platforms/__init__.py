"""What drivers run on: the platform interfaces and their implementations.

* :mod:`xenpv.platforms.base` — the interfaces drivers are given (grant table, event
  channels, xenstore accessor; ``typing.Protocol`` classes) and the errors they raise.
* :mod:`xenpv.platforms.dispatch` — one event dispatcher per event-channel handle, so
  every driver in a loop shares the handle's one fd (console and vchan use it).
* :mod:`xenpv.platforms.loopback` — the loopback emulator: Xen's grant tables, event
  channels and xenstored on plain Linux, in one process or across processes.
* :mod:`xenpv.platforms.xen` — real Xen through Xen's C libraries (which also run on the
  emulator through its replacement libraries).
"""
