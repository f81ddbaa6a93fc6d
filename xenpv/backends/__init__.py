"""xenpv.backends: the host halves of split drivers.

* :mod:`xenpv.backends.console` -- consoles served on ptys and log files, like xenconsoled
  (:class:`ConsoleBackend`, :class:`ConsoleConfig`).
"""

from xenpv.backends.console import ConsoleBackend, ConsoleConfig

__all__ = ["ConsoleBackend", "ConsoleConfig"]
