"""Test rigs: whole machines and peer processes for tests, benchmarks and fuzzing.

* :mod:`xenpv.testing.vchan` -- :class:`~xenpv.testing.vchan.VchanLab`: a loopback daemon,
  its domains, and programs started in a domain's environment (``python -m
  xenpv.vchan.tool``, Xen's ``vchan-socket-proxy``, C programs linked with libxenvchan).
* :mod:`xenpv.testing.clock` -- :class:`~xenpv.testing.clock.ScriptedClock`: a stand-in for
  ``time`` in a module under test, for bounded polling loops.
* :mod:`xenpv.testing.xenmode` -- :func:`~xenpv.testing.xenmode.xen_platform`: the real-Xen
  platform acting as a domain of the emulator (through the replacement libraries).
* :mod:`xenpv.testing.usbhid` -- emulated USB HID devices behind pyusb's pluggable
  backend interface (these machines have no USB), for the USB HID input source.
* :mod:`xenpv.testing.world` -- :func:`~xenpv.testing.world.domain_world`: an embedded
  xenstored with one client per domain and the in-process emulator holding the domains,
  for device pairs (the pair and hostile tests, the driver fuzz targets).

The emulated machines themselves are :mod:`xenpv.platforms.loopback.harness`.  Nothing in
the drivers imports this package (tests/unit/test_layers.py).
"""
