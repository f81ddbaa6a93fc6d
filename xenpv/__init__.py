"""xenpv: Xen paravirtual split drivers in Python.

Layers, bottom to top: ``rings`` (compiled shared and byte rings), ``protocols`` (sans-IO
wire layouts), ``xenstore`` (wire codec, client, embedded server), ``xenbus`` (state machine
and device model), ``platforms`` (real Xen or the loopback emulator), and the drivers
(``frontends``, ``backends``, ``vchan``).  See ``docs/`` for the user guide.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
