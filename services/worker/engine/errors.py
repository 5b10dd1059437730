"""Domain errors raised by the engine core; the gRPC edge maps them to status codes."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A request carries a value the engine cannot serve (maps to INVALID_ARGUMENT).

    `field` names the offending request field so the edge can report it verbatim.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is at its limit (maps to RESOURCE_EXHAUSTED)."""


class EngineDead(RuntimeError):
    """The engine loop stopped after an internal failure (maps to UNAVAILABLE / INTERNAL)."""
