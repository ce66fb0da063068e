"""The process's memory: glibc's allocator settings for each kind of process, and what a finished job hands back.

Every process of the stack moves large buffers (images, meshes, artifact chunks of 1 MiB). With glibc's defaults,
buffers of that size come from fresh ``mmap`` regions or from heap that was just returned to the system, so every
page is faulted in again, at several microseconds a page here. Each kind of process gets the settings that let it
reuse what it freed (:data:`STREAMING`, :data:`MODEL`, :data:`RECEIVING`), applied once as it starts
(:func:`tune_malloc`); ``docs/benchmarks.md`` has the measurements.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from dataclasses import dataclass

#: glibc ``mallopt`` parameters (malloc.h); see :func:`tune_malloc`.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
               "MALLOC_ARENA_MAX")


@dataclass(frozen=True)
class MallocProfile:
    """glibc allocator settings for one kind of process (:func:`tune_malloc`).

    Args:
        mmap_threshold: Allocations up to this size come from the heap, where freed memory is reused, instead of
            fresh ``mmap`` regions that fault in every page again. None: no allocation is served by ``mmap`` at all
            (``M_MMAP_MAX`` 0), so blocks above the highest threshold glibc takes (32 MiB) come from the heap too.
        trim_threshold: Free memory at the heap's top that is kept instead of returned to the system.
        arenas: At most this many malloc arenas (0: glibc's default, up to 8 per core).
    """

    name: str
    mmap_threshold: int | None
    trim_threshold: int
    arenas: int = 0

    def environment(self) -> dict[str, str]:
        """The same settings as environment variables, which glibc reads as a process starts: for a process this
        package does not start itself (a program using :class:`~trellisbox.TrellisBoxClient`, a benchmark's child)."""
        env = {"MALLOC_TRIM_THRESHOLD_": str(self.trim_threshold)}
        if self.mmap_threshold is None:
            env["MALLOC_MMAP_MAX_"] = "0"
        else:
            env["MALLOC_MMAP_THRESHOLD_"] = str(self.mmap_threshold)
        if self.arenas:
            env["MALLOC_ARENA_MAX"] = str(self.arenas)
        return env

    def describe(self) -> str:
        """One line for the log."""
        mmap = "no mmap" if self.mmap_threshold is None else f"mmap threshold {self.mmap_threshold // 2**20} MiB"
        arenas = f", {self.arenas} arena{'s' if self.arenas > 1 else ''}" if self.arenas else ""
        return f"malloc ({self.name}): {mmap}, trim threshold {self.trim_threshold // 2**20} MiB{arenas}"


#: The gateway: it only relays. Every relayed chunk allocates and frees a few buffers of about 1 MiB (the
#: received message, the frame sent on), which glibc would serve from fresh ``mmap`` regions or heap top it has
#: just trimmed, since a streaming process never frees the larger block that raises glibc's dynamic threshold.
#: Measured: the gateway's CPU per relayed MiB drops by about a quarter (docs/benchmarks.md).
STREAMING = MallocProfile("streaming", mmap_threshold=4 * 2**20, trim_threshold=16 * 2**20)

#: A model service: the model runs on its own thread, the input is decoded and the outputs encoded on others, and
#: each thread allocating gets its own arena, so memory one stage freed is never reused by the next: every job
#: faulted in its working set afresh (~6,000 page faults per 512² preview job, 7,000 per classic refine, against
#: ~700 for the same work on one thread). One arena (the GIL serializes the Python side anyway), a 32 MiB mmap
#: threshold (the most glibc's dynamic threshold would reach: numpy/torch arrays up to that size are reused) and a
#: 128 MiB trim threshold keep a warm job's memory for the next one: page faults per job drop to under a hundred.
#: The model worker returns it to the system once the service is idle (``ModelWorker(release_when_idle_s=...)``), and
#: the TRELLIS servicer after every heavy job.
MODEL = MallocProfile("model", mmap_threshold=32 * 2**20, trim_threshold=128 * 2**20, arenas=1)

#: A client receiving artifacts: the ``trellisbox`` command and the web form, and any program started with the
#: :meth:`MallocProfile.environment` of this (README, "Python client"). The client keeps each artifact whole, then lets
#: it go once it is written out or shown. glibc serves a block above 32 MiB (the highest mmap threshold it takes) from
#: a fresh ``mmap`` region, and with its defaults smaller ones often too (the dynamic threshold only rises once such a
#: block is freed): every page of every artifact, and of many 1 MiB messages, is faulted in anew. No ``mmap`` and a
#: 256 MiB trim threshold: the next call reuses the pages the last one freed. Measured in a fresh client process on the
#: transport benchmark's streams (docs/benchmarks.md, eighth round): 0.4-0.75 ms less CPU per MiB received, checked and
#: kept, a third or more of what the client spent. The cost: up to 256 MiB freed is kept for the next artifact.
RECEIVING = MallocProfile("receiving", mmap_threshold=None, trim_threshold=256 * 2**20)


def tune_malloc(profile: MallocProfile = STREAMING) -> str:
    """Apply ``profile`` to glibc's allocator (see :data:`STREAMING`, :data:`MODEL` and :data:`RECEIVING` for why).

    Only on glibc, not when the operator set any of glibc's allocator settings in the environment (``MALLOC_*``,
    ``GLIBC_TUNABLES=glibc.malloc.*``), and not with ``TRELLISBOX_MALLOC=default``.

    Returns:
        What was done, for the log.
    """
    if not sys.platform.startswith("linux"):
        return "malloc: default (not Linux)"
    if os.environ.get("TRELLISBOX_MALLOC", "").strip().lower() == "default":
        return "malloc: glibc defaults (TRELLISBOX_MALLOC=default)"
    if any(name in os.environ for name in _MALLOC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "malloc: the environment's MALLOC_* / GLIBC_TUNABLES settings kept"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present on glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc: default (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = [(_M_TRIM_THRESHOLD, profile.trim_threshold),
                (_M_MMAP_MAX, 0) if profile.mmap_threshold is None else (_M_MMAP_THRESHOLD, profile.mmap_threshold)]
    if profile.arenas:
        settings.append((_M_ARENA_MAX, profile.arenas))
    if not all(mallopt(param, value) == 1 for param, value in settings):
        return "malloc: default (mallopt refused)"
    return profile.describe()


def settle_heap() -> None:
    """Move every object that exists once the service is warm (modules, the model, its caches) out of the cyclic
    collector's reach (``gc.freeze``): a full collection then walks only what requests allocated since. Measured in
    the TRELLIS service (preview backend, ~100k objects after warm-up): ``gc.collect()`` 55-60 ms before, under
    1 ms after; it ran on every request's path (:func:`release_memory`), and the interpreter's own full
    collections walk the same heap. Objects frozen here are never collected, so garbage is collected first."""
    gc.collect()
    gc.freeze()


def release_memory(*, collect: bool = True, trim: bool = True) -> None:
    """Free what a finished job left behind: cyclic garbage now (``collect``; trimesh's caches hold big arrays in
    reference cycles, which the collector would otherwise reach only after many more allocations), then the heap's
    free pages back to the system (``trim``, glibc; 5-30 ms, without the GIL). Measured on the TRELLIS service: RSS
    stays flat over heavy jobs instead of growing by the job's size each time; on the gateway, memory taken by a
    burst of large uploads is returned once they are done (docs/reliability.md)."""
    if collect:
        gc.collect()
    if trim and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)
