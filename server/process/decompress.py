"""zstd decompression on the process server, one context per thread and purpose (a context is not safe to share
between threads, and making one per chunk would cost more than many small chunks take to decompress).

Chunks (from a stream, from a pack) are decompressed with a window no larger than a chunk: a frame that claims a
larger one is refused before memory is taken for it. Manifests are larger than a chunk and are bounded by the
output size their caller allows."""

from __future__ import annotations

import threading

import zstandard

from agent.shared.replication_wire import MAX_CHUNK_SIZE

_threads = threading.local()


def chunk_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's context for chunks: its window at most a chunk."""
    d: zstandard.ZstdDecompressor | None = getattr(_threads, "chunks", None)
    if d is None:
        d = _threads.chunks = zstandard.ZstdDecompressor(max_window_size=MAX_CHUNK_SIZE)
    return d


def manifest_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's context for manifests (its callers bound what it may write with ``max_output_size``)."""
    d: zstandard.ZstdDecompressor | None = getattr(_threads, "manifests", None)
    if d is None:
        d = _threads.manifests = zstandard.ZstdDecompressor()
    return d
