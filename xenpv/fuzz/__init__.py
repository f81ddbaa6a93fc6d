"""Hostile peers, fuzz targets and the campaign runner (user guide: docs/fuzzing.md).

The invariant every target checks: hostile input may only ever produce a
:class:`~xenpv.errors.PeerError` -- no other exception, no hang, no access outside the
shared memory, no double fetch, bounded work and queues, repeatable teardown.

* :mod:`~xenpv.fuzz.memory` -- instrumented shared pages (access log, racing reads);
* :mod:`~xenpv.fuzz.source` -- fuzz input read as a list of decisions;
* :mod:`~xenpv.fuzz.ringspecs`, :mod:`~xenpv.fuzz.victims` -- ring protocols and the
  default sans-IO drivers attacked;
* :mod:`~xenpv.fuzz.hostile`, :mod:`~xenpv.fuzz.byterings` -- hostile ring peers and
  byte-ring producers with the invariant checks;
* :mod:`~xenpv.fuzz.xenbus`, :mod:`~xenpv.fuzz.external`, :mod:`~xenpv.fuzz.xsmodel` --
  the hostile xenbus peer, the hostile xenstore client against a server process, the
  xenstore reference model;
* :mod:`~xenpv.fuzz.targets`, :mod:`~xenpv.fuzz.runner`, :mod:`~xenpv.fuzz.worker` --
  the target registry, the engines (atheris, random), reproducers and replay;
* :mod:`~xenpv.fuzz.strategies`, :mod:`~xenpv.fuzz.machines` -- Hypothesis strategies
  and rule-based state machines;
* :mod:`~xenpv.fuzz.seeds`, :mod:`~xenpv.fuzz.platform` -- scenario seeds, held grants
  and event storms.

The package needs the ``test`` extra (Hypothesis; atheris for coverage guidance).
"""
