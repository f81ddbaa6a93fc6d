"""xenpv.frontends: the guest halves of split drivers.

* :mod:`xenpv.frontends.console` -- console 0 and secondary consoles as asyncio streams
  (:class:`PrimaryConsole`, :class:`ConsoleFrontend`).
"""

from xenpv.frontends.console import ConsoleFrontend, PrimaryConsole

__all__ = ["ConsoleFrontend", "PrimaryConsole"]
