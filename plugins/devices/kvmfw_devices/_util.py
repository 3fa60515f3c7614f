"""Small helpers shared by the device modules: little-endian packing and access checks."""

from __future__ import annotations

from kvmfw.eventq import Event, EventQueue


def to_int(data: bytes | bytearray | memoryview) -> int:
    """The little-endian integer a guest wrote."""
    return int.from_bytes(data, "little")


def to_bytes(value: int, size: int) -> bytes:
    """``value`` as ``size`` little-endian bytes (truncated to fit)."""
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def ones(size: int) -> bytes:
    """What an unanswered read returns: all ones."""
    return b"\xff" * size


def schedule_at(eventq: EventQueue, event: Event, when: int) -> None:
    """(Re)schedule ``event`` at ``when``, or now if ``when`` is already past."""
    with eventq.lock:
        if event.scheduled:
            eventq.deschedule(event)
        eventq.post(event, when)  # not schedule(): another vCPU thread may move time on


def cancel(eventq: EventQueue, event: Event) -> None:
    """Deschedule ``event`` if it is scheduled."""
    if event.scheduled:
        eventq.deschedule(event)
