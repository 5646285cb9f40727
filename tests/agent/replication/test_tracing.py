"""agent/replication/tracing.py: parsing trace_pipe text as the kernel writes it, and the event filter."""

from __future__ import annotations

from agent.replication.tracing import event_filter, parse, trace_dev

LINES = b"""\
     ksoftirqd/1-22      [001] ..s..  2792.573320: block_rq_complete: 7,0 WS () 19458 + 8 be,0,4 [0]
     ksoftirqd/1-22      [001] ..s..  2792.573374: block_rq_complete: 8,16 FWFS (28 00 00 01) 4096 + 256 be,0,4 [0]
CPU:1 [LOST 14620 EVENTS]
          python-77      [000] .....  2792.600000: tracing_mark_write: mobility-drain-12
     kworker/0:1-9       [000] ..s..  2792.600100: block_rq_complete: 7,0 D () 0 + 2048 none,0,0 [0]
"""


def test_events_lost_counts_and_markers_are_read_from_kernel_lines() -> None:
    parsed = parse(LINES)
    assert parsed.events == [(trace_dev(7, 0), 19458, 8), (trace_dev(8, 16), 4096, 256), (trace_dev(7, 0), 0, 2048)]
    assert parsed.lost == 14620
    assert parsed.markers == [12]


def test_the_filter_names_each_device_and_only_writes_discards_and_write_zeroes() -> None:
    assert event_filter([trace_dev(7, 0), trace_dev(259, 1)]) == (
        '(dev == 7340032 || dev == 271581185) && rwbs ~ "*[WDN]*"'
    )
    assert event_filter([]) == "dev == 0"


def test_the_kept_tracing_is_trusted_only_after_its_own_stop_marker_with_nothing_lost() -> None:
    """Adopting the instance a clean stop left: its stop marker, found before anything was lost, makes the
    tracing continuous; a loss reported before the marker (the buffer overflowed while the agent was down) or no
    marker at all does not."""
    import threading

    from agent.replication.tracing import Tracer

    nonce = "ab" * 16
    marker = b"  python-7 [000] .....  1.0: tracing_mark_write: mobility-stopped-" + nonce.encode() + b"\n"

    def adopted(*chunks: bytes) -> bool:
        tracer = Tracer.__new__(Tracer)
        tracer.targets, tracer._lock, tracer._cond = {}, threading.Lock(), threading.Condition()
        tracer.lost_total = tracer.events_total = tracer._seen = 0
        tracer.on_lost = lambda n: None
        tracer.adopted, tracer._expect, tracer._stop_seen, tracer._lost_before_stop = True, nonce, False, False
        for chunk in chunks:
            tracer._apply(parse(chunk), 0.0)
        return tracer.continuous

    assert adopted(LINES.split(b"CPU:1")[0], marker)
    assert not adopted(b"CPU:0 [LOST 3 EVENTS]\n", marker)
    assert not adopted(LINES.split(b"CPU:1")[0])
    assert not adopted(marker.replace(nonce.encode(), b"cd" * 16))  # another stop's marker


def test_a_line_the_parser_does_not_understand_is_a_loss_never_silence() -> None:
    """A kernel whose tracepoint prints another format: the write is in a line the parser cannot read. It counts as
    not understood (markers written to the instance and blank lines do not), and the tracer reports it as a loss
    with REPL-TRACE-UNPARSABLE and the line, so every disk resyncs instead of points matching a stale replica."""
    import threading

    from agent.replication.tracing import Tracer
    from agent.shared.errors import MobilityError

    other_format = b"   kworker/1:2-80  [001] d..1.  2792.6: block_rq_complete: dev=7:0 op=WRITE sector=8 nr=8\n"
    noise = b"\n  python-7 [000] .....  1.0: tracing_mark_write: someone else's note\n"
    parsed = parse(LINES + other_format + noise)
    assert parsed.unknown == 1 and parsed.sample == other_format.rstrip(b"\n")
    assert len(parsed.events) == 3 and parsed.markers == [12] and parsed.lost == 14620
    assert parse(LINES + noise).unknown == 0

    told: list[MobilityError] = []
    tracer = Tracer.__new__(Tracer)
    tracer.targets, tracer._lock, tracer._cond = {}, threading.Lock(), threading.Condition()
    tracer.lost_total = tracer.events_total = tracer._seen = 0
    tracer.on_lost = told.append
    tracer.adopted, tracer._expect, tracer._stop_seen, tracer._lost_before_stop = False, None, False, False
    tracer._apply(parse(other_format), 0.0)
    assert [e.id for e in told] == ["REPL-TRACE-UNPARSABLE"]
    assert "dev=7:0 op=WRITE" in told[0].message
    tracer._apply(parse(LINES), 0.0)
    assert [e.id for e in told] == ["REPL-TRACE-UNPARSABLE", "REPL-EVENTS-LOST"]
