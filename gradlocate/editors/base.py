"""What every editor shares: the weight it edits in place, and the exact undo.

An editor holds its layer's site (``handle``) and an :class:`~gradlocate.state.Undo` of its
weight made before anything changed; this mixin turns those into the editor interface's
undo half (:mod:`gradlocate.editors`): ``edited``, ``delta``, ``restore``, ``commit``, and
a context manager that restores on exit unless committed.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from gradlocate.dims import Weight
from gradlocate.handles import Handle
from gradlocate.state import Undo

__all__ = ["InPlaceEdit"]

_E = TypeVar("_E", bound="InPlaceEdit")


class InPlaceEdit:
    """The undo half of an editor (``handle`` and ``undo`` are set by the editor)."""

    handle: Handle
    undo: Undo

    @property
    def edited(self) -> bool:
        """Whether the weight differs (bitwise) from when the editor was made."""
        return self.undo.changed

    @property
    def delta(self) -> Weight:
        """The edit: current weight minus the original, as ``[d_model, d_mlp]``."""
        return self.handle.canonical(self.undo.delta)

    def restore(self) -> None:
        """Put the original weight back, bit for bit."""
        self.undo.restore()

    def commit(self) -> None:
        """Keep the edit: the context manager will not restore it; the copy is released."""
        self.undo.commit()

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        if not self.undo.committed:
            self.restore()
        return False
