"""How long work reports how far it is: the CLI draws a bar, the library prints nothing."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress", "Silent"]


class Progress(Protocol):
    """``start`` a stage of ``total`` items, ``advance`` by ``n`` done, ``finish`` the stage."""

    def start(self, stage: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def finish(self) -> None: ...


class Silent:
    """A ``Progress`` that reports nowhere."""

    def start(self, stage: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass
