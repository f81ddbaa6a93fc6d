"""Fuzz campaigns: engines, reproducer files, replay.

Theory of operation
-------------------
A campaign runs one target (:mod:`xenpv.fuzz.targets`) for a time box and/or a number of
runs, with one of two engines:

* ``atheris`` (coverage-guided, libFuzzer underneath): a worker process
  (``python -m xenpv.fuzz.worker``) instruments xenpv's modules, then lets libFuzzer drive
  the target; libFuzzer prints its own progress lines (``exec/s``, ``cov``, ``corp``).
  libFuzzer ends the process with ``exit()``, so it runs in a child and the parent reads
  the outcome from the reproducer directory.
* ``random`` (no coverage, always available): mutations (bit flips, byte changes,
  inserts, deletes, splices) of a small corpus seeded from ``seeds``, deterministic for a
  given ``--seed``; progress is printed once a second.

In both engines a *failure* is any exception the target lets escape (an
:class:`~xenpv.fuzz.hostile.InvariantViolation` or anything else that is not a handled
PeerError).  Every distinct failure (same exception type and first message line, digits
ignored) is written once as a reproducer file: the line ``xenpv-fuzz-reproducer 1
<target>`` followed by the raw input bytes.  :func:`replay` runs such a file again.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from xenpv.errors import LocalError

__all__ = [
    "CampaignResult",
    "Failure",
    "FailureLog",
    "close_target",
    "mutate",
    "read_reproducer",
    "replay",
    "run_atheris",
    "run_random",
    "write_reproducer",
]

MAGIC = b"xenpv-fuzz-reproducer 1 "
#: Inputs are capped at this many bytes (operation lists are bounded by the targets too).
MAX_LEN = 4096
#: At most this many reproducers per campaign (distinct failures beyond are counted only).
MAX_REPRODUCERS = 32


@dataclass(frozen=True)
class Failure:
    """One distinct failure of a campaign and the reproducer written for it."""

    target: str
    signature: str
    message: str
    path: Path


@dataclass
class CampaignResult:
    """What a campaign did."""

    target: str
    engine: str
    runs: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    failing_runs: int = 0

    @property
    def execs_per_s(self) -> float:
        """Inputs run per second."""
        return self.runs / self.seconds if self.seconds > 0 else 0.0


def signature(exc: BaseException) -> str:
    """Failure identity: exception type and first message line with numbers blanked."""
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', first)[:160]}"


def describe(exc: BaseException) -> str:
    """The failure text stored with a reproducer and printed on replay."""
    text = str(exc)
    if "Traceback" not in text:
        text += "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=12))
    return f"{type(exc).__name__}: {text}"


def safe_name(target: str) -> str:
    """A file-name form of a target name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", target)


def write_reproducer(out_dir: str | os.PathLike[str], target: str, data: bytes) -> Path:
    """Write ``data`` as a reproducer of ``target`` into ``out_dir``; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(data).hexdigest()[:16]
    path = out / f"{safe_name(target)}-{digest}.repro"
    path.write_bytes(MAGIC + target.encode() + b"\n" + data)
    return path


def read_reproducer(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """``(target, input)`` of a reproducer file."""
    blob = Path(path).read_bytes()
    if not blob.startswith(MAGIC) or b"\n" not in blob:
        raise LocalError(f"{path} is not a xenpv fuzz reproducer")
    head, data = blob.split(b"\n", 1)
    return head[len(MAGIC) :].decode(), data


def replay(path: str | os.PathLike[str], victim: Any = None) -> str | None:
    """Run a reproducer again: the failure text if it still fails, else None."""
    from xenpv.fuzz.targets import get_target

    target, data = read_reproducer(path)
    fn = get_target(target, victim)
    try:
        fn(data)
    except Exception as e:
        return describe(e)
    finally:
        close_target(fn)
    return None


def close_target(fn: Callable[[bytes], None]) -> None:
    """Release what a target function holds (a victim process), if anything."""
    close = getattr(fn, "close", None)
    if close is not None:
        close()


class FailureLog:
    """Records distinct failures of one campaign as reproducer files."""

    def __init__(self, target: str, out_dir: str | os.PathLike[str]) -> None:
        self.target = target
        self.out_dir = Path(out_dir)
        self.failures: list[Failure] = []
        self.seen: set[str] = set()
        self.failing_runs = 0

    def record(self, data: bytes, exc: BaseException) -> Failure | None:
        """Note a failing input; write a reproducer if the failure is new."""
        self.failing_runs += 1
        sig = signature(exc)
        if sig in self.seen or len(self.failures) >= MAX_REPRODUCERS:
            return None
        self.seen.add(sig)
        path = write_reproducer(self.out_dir, self.target, data)
        failure = Failure(self.target, sig, describe(exc), path)
        self.failures.append(failure)
        return failure


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """One random mutation of ``data`` (libFuzzer-style, without coverage)."""
    buf = bytearray(data)
    for _ in range(1 + rng.randrange(4)):
        kind = rng.randrange(7)
        if kind == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 2:
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(1 + rng.randrange(16))
        elif kind == 3 and len(buf) > 1:
            at = rng.randrange(len(buf))
            del buf[at : at + 1 + rng.randrange(16)]
        elif kind == 4 and corpus:
            other = rng.choice(corpus)
            cut = rng.randrange(len(buf) + 1)
            buf = buf[:cut] + other[rng.randrange(len(other) + 1) :]
        elif kind == 5 and len(buf) >= 4:
            at = rng.randrange(len(buf) - 3)
            buf[at : at + 4] = rng.choice((0, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000,
                                           rng.getrandbits(32))).to_bytes(4, "little")
        else:
            buf += rng.randbytes(1 + rng.randrange(64))
    return bytes(buf[:MAX_LEN])


def run_random(
    target: str,
    fn: Callable[[bytes], None],
    *,
    out_dir: str | os.PathLike[str],
    seconds: float | None = 10.0,
    runs: int | None = None,
    seed: int = 0,
    seeds: Iterable[bytes] = (),
    progress: TextIO | None = None,
) -> CampaignResult:
    """Run ``fn`` on mutated inputs until ``seconds`` pass or ``runs`` inputs ran."""
    rng = random.Random(seed)
    corpus = [bytes(s) for s in seeds] or [b""]
    corpus += [rng.randbytes(rng.randrange(1, 256)) for _ in range(8)]
    log = FailureLog(target, out_dir)
    result = CampaignResult(target, "random")
    start = time.monotonic()
    next_report = start + 1.0
    pending = list(corpus)  # run the seeds themselves first
    while True:
        now = time.monotonic()
        if (seconds is not None and now - start >= seconds) or (runs is not None and result.runs >= runs):
            break
        data = pending.pop() if pending else mutate(rng.choice(corpus), rng, corpus)
        try:
            fn(data)
        except Exception as e:
            failure = log.record(data, e)
            if failure is not None and progress is not None:
                print(f"FAILURE {failure.signature}\n  reproducer: {failure.path}", file=progress)
        else:
            if len(corpus) < 256 and rng.randrange(32) == 0:
                corpus.append(data)
        result.runs += 1
        if progress is not None and now >= next_report:
            next_report = now + 1.0
            print(f"#{result.runs} {result.runs / max(now - start, 1e-9):,.0f} execs/s "
                  f"examples {len(corpus)} failures {len(log.failures)}", file=progress, flush=True)
    result.seconds = time.monotonic() - start
    result.failures = log.failures
    result.failing_runs = log.failing_runs
    return result


def run_atheris(
    target: str,
    *,
    out_dir: str | os.PathLike[str],
    seconds: float | None = 10.0,
    runs: int | None = None,
    seed: int = 0,
    victim: str | None = None,
    seed_dir: str | os.PathLike[str] | None = None,
    quiet: bool = False,
) -> CampaignResult:
    """Run a coverage-guided campaign in a worker process; failures are read back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.repro"))
    cmd = [sys.executable, "-m", "xenpv.fuzz.worker", target, "--out", str(out), "--seed", str(seed)]
    if seconds is not None:
        cmd += ["--time", str(max(1, round(seconds)))]
    if runs is not None:
        cmd += ["--runs", str(runs)]
    if victim:
        cmd += ["--victim", victim]
    if seed_dir:
        cmd += ["--seeds", str(seed_dir)]
    started = time.monotonic()
    limit = (seconds or 600) + 120
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.PIPE if quiet else None, timeout=limit, check=False)
    result = CampaignResult(target, "atheris", seconds=time.monotonic() - started)
    stats = out / f".{safe_name(target)}.runs"
    if stats.exists():
        result.runs = int(stats.read_text() or 0)
        stats.unlink()
    if proc.returncode not in (0, 1):
        err = (proc.stderr or b"")[-2000:].decode(errors="replace") if quiet else ""
        raise LocalError(f"fuzz worker for {target} exited with {proc.returncode}: {err}")
    for path in sorted(set(out.glob("*.repro")) - before):
        name, _ = read_reproducer(path)
        if name == target:
            result.failures.append(Failure(target, path.name, "", path))
    result.failing_runs = len(result.failures)
    return result
