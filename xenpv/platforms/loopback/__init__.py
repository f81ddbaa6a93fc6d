"""The loopback emulator: a hypervisor and xenstored for several domains on one machine.

* ``core`` — the hypervisor state (domains, grant tables, event channels, accounting,
  fault injection), shared by both modes;
* ``inprocess`` — platforms of several domains in one process (unit tests, fuzzing);
* ``daemon`` / ``client`` — ``xenpv loopback up`` and the platform of a process acting as
  one domain (docs/loopback-protocol.md is the wire contract);
* ``memory``, ``events``, ``proto`` — page mapping, ``/dev/xen/evtchn`` masking, framing;
* ``harness``, ``remote`` — whole emulated machines for tests and benchmarks;
* ``shim/`` — replacement C libraries so unmodified Xen programs run on the emulator.

User guide: docs/loopback.md.
"""
