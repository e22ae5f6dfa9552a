"""Interventions: the one place gradlocate intercepts a model (after ROME's
``util/nethook.py``).

Every tool is a context manager over a resolved model (:class:`~gradlocate.handles.Handles`)
that puts everything back when its block ends. The tools that change a forward only
register an intervention; :func:`run` makes one forward through nnsight - the same
``Envoy`` s the handles give users - and applies every intervention active in this
thread at its module, in the order the forward reaches them (recorded once from one
real forward, not guessed from the modules' declaration order).

    using(h, params=())        own the model for the block: one thread at a time, eval mode,
                               grad only on ``params``, their ``.grad`` kept; all restored
    capture(h, paths)          record modules' outputs (and inputs) in the forwards inside
    replaced(h, path, fn)      a module's output becomes ``fn(output)``
    edited(h, path, fn)        a module's output becomes ``fn(input, output)`` (a per-row weight delta)
    noised(h, noise, start)    add ``noise`` to the input embeddings from position ``start`` on
    restored(h, patches)       write given states at (row, position) of modules' outputs
    from_layer(h, layer, fn)   blocks below ``layer`` are skipped: the stream entering it is ``fn()``
    head_at(h, rows, pos)      the LM head runs only at these (row, position) pairs
    stop_after(h, path)        end the forward once a module has run
    run(h, **inputs)           one forward applying every active intervention
    instrumented(model)        a bare nnsight wrapper for the block, taken off afterwards

Example:
    >>> import torch
    >>> from gradlocate import down_projections
    >>> from gradlocate.models import tiny
    >>> model, tok = tiny("llama", n_layers=2, d_model=16)
    >>> h = down_projections(model)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> with using(h), capture(h, [h[1].path], inputs=True) as cap, head_at(h, torch.tensor([0]), torch.tensor([3])):
    ...     out = run(h, input_ids=ids)
    >>> tuple(cap.inputs[h[1].path].shape), tuple(out.logits.shape)   # the head ran at one position
    ((1, 4, 64), (1, 1, 258))
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from gradlocate import _compat
from gradlocate.handles import Handles
from gradlocate.state import input_device

__all__ = [
    "ModelBusyError",
    "using",
    "require_gradients",
    "capture",
    "Capture",
    "replaced",
    "edited",
    "noised",
    "restored",
    "from_layer",
    "head_at",
    "stop_after",
    "run",
    "instrumented",
    "states",
    "rewrap",
    "rewrappable",
    "no_cache",
    "path_of",
    "Patch",
]


class ModelBusyError(RuntimeError):
    """Another thread is running a gradlocate function on this model: gradlocate
    changes a model's state while it computes, so it takes one caller at a time."""


# --------------------------------------------------------------------------- ownership


@dataclass
class _Session:
    thread: int
    depth: int = 0
    envoy: Any = None
    had: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    running: int = 0  # > 0 while run() makes a forward: tests check no forward happens outside it


_sessions: weakref.WeakKeyDictionary[nn.Module, _Session] = weakref.WeakKeyDictionary()
_sessions_lock = threading.Lock()


def _session(h: Handles) -> _Session:
    s = _sessions.get(h.root)
    if s is None or s.thread != threading.get_ident():
        raise RuntimeError("gradlocate.interventions: run() and the tools need an active `with using(h):` block "
                           "in this thread")
    return s


@contextlib.contextmanager
def using(h: Handles, params: Sequence[Tensor] = ()) -> Iterator[None]:
    """Own ``h``'s model for the block: eval mode (no dropout), gradients only for
    ``params`` (their ``.grad`` set aside and put back), nnsight's instrumentation on;
    every flag, mode, ``.grad`` and attribute is restored on exit, also on errors.

    Re-entrant in one thread. A second thread gets :class:`ModelBusyError` at once,
    before anything is changed: two callers on one model would each see the other's
    changes.
    """
    root, me = h.root, threading.get_ident()
    if params:
        require_gradients("this computation")
    with _sessions_lock:
        s = _sessions.get(root)
        if s is not None and s.thread != me:
            raise ModelBusyError(
                f"{type(root).__name__} is in use by another thread (a gradlocate function is running on it): "
                f"gradlocate changes a model's state while it computes, so it serves one caller at a time. "
                f"Wait for that call to finish, or give each thread its own copy of the model")
        if s is None:
            s = _sessions[root] = _Session(me)
        s.depth += 1
    flags = [(p, p.requires_grad) for p in root.parameters()]
    modes = [(m, m.training) for m in root.modules()]
    keep = {id(t) for t in params}
    grads = [(t, t.grad) for t in params]
    try:
        if s.envoy is None:
            from nnsight import NNsight

            s.had = _compat.instrumentation(root)
            s.envoy = NNsight(root)
        root.eval()
        for p, _ in flags:
            p.requires_grad_(id(p) in keep)
        for t in params:
            t.grad = None
        yield
    finally:
        for t, g in grads:
            t.grad = g
        for p, f in flags:
            p.requires_grad_(f)
        for m, training in modes:
            m.training = training
        with _sessions_lock:
            s.depth -= 1
            if s.depth == 0:
                if s.envoy is not None:
                    _compat.uninstrument(root, s.had)
                del _sessions[root]


def require_gradients(what: str) -> None:
    """Gradients can be enabled inside ``torch.no_grad()`` (gradlocate does so itself), but
    not inside ``torch.inference_mode()``: say so, before anything runs."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} needs gradients, which torch.inference_mode() forbids (it cannot be lifted from "
                           f"inside): call it outside the inference_mode block (torch.no_grad() is fine)")


# --------------------------------------------------------------------------- registration


@dataclass(eq=False)
class _Event:
    path: str
    phase: str  # "input" | "skip" (before the module runs) | "output" | "stop" (after)
    fn: Callable[..., Any]

    @property
    def before(self) -> bool:
        return self.phase in ("input", "skip")


@contextlib.contextmanager
def _registered(h: Handles, events: list[_Event]) -> Iterator[None]:
    s = _session(h)
    s.events.extend(events)
    try:
        yield
    finally:
        for e in events:
            s.events.remove(e)


def _order(h: Handles) -> dict[str, tuple[int, int]]:
    """For each module path, the indices of its first call's start and end in the
    model's real forward (:func:`_record_order`; cached in ``h._cache`` and, for later
    resolutions, per model while its modules stay the same): an intervention before a
    module is keyed by its start, one after it by its end. nnsight waits at each module
    its trace body asks for, so the body must ask in this order."""
    order = h._cache.get("order")
    if order is None:
        # Each resolution of a plain model is a new Handles: the order recorded for the
        # same root with the same modules is reused (no extra forward per call).
        layout = tuple((n, id(m)) for n, m in h.root.named_modules(remove_duplicate=False))
        known = _orders.get(h.root)
        order = known[1] if known is not None and known[0] == layout else _record_order(h)
        _orders[h.root] = (layout, order)
        h._cache["order"] = order
    return order


_orders: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, tuple[int, int]]]] = weakref.WeakKeyDictionary()


def _record_order(h: Handles) -> dict[str, tuple[int, int]]:
    """One forward of ``h``'s model on a 2-token input with a pre- and a post-hook on
    every module, counting each module's first call start and end on one clock. The
    declaration order of children says nothing about the order a forward calls them in
    (LLaMA declares its norms after the MLP). Hooks are removed and the model's modes
    restored, also on errors; no gradient is recorded."""
    root = h.root
    clock = itertools.count()
    first: dict[int, list[int]] = {}

    def pre(m: nn.Module, args: Any) -> None:
        first.setdefault(id(m), [next(clock), -1])

    def post(m: nn.Module, args: Any, out: Any) -> None:
        if first[id(m)][1] < 0:
            first[id(m)][1] = next(clock)

    modules = {id(m): m for m in root.modules()}
    hooks = [hook for m in modules.values()
             for hook in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    modes = [(m, m.training) for m in modules.values()]
    ids = torch.zeros(1, 2, dtype=torch.long, device=input_device(root))
    try:
        root.eval()
        with torch.no_grad():
            root(input_ids=ids, **no_cache(root))
    finally:
        for hook in hooks:
            hook.remove()
        for m, t in modes:
            m.training = t
    return {name: (first[id(m)][0], first[id(m)][1])
            for name, m in root.named_modules(remove_duplicate=False) if id(m) in first}


def _keys(h: Handles, path: str) -> tuple[int, int]:
    """:func:`_order`'s keys of ``path``, or an error saying why there are none."""
    order = _order(h)
    if path not in order:
        try:
            h.root.get_submodule(path)
        except AttributeError:
            raise ValueError(f"no module {path!r} in {type(h.root).__name__}: an intervention needs the path of "
                             f"one of its modules (e.g. {h.block_paths[0]!r})") from None
        raise ValueError(f"module {path!r} is never called in {type(h.root).__name__}'s forward (recorded on a "
                         f"2-token input): an intervention there would never apply")
    return order[path]


def path_of(h: Handles, module: nn.Module) -> str:
    """The path of ``module`` from ``h``'s root (cached per resolution)."""
    paths = h._cache.setdefault("paths", {})
    if id(module) not in paths:
        paths[id(module)] = next((n for n, m in h.root.named_modules() if m is module), "")
    return paths[id(module)]


def _path_of_required(h: Handles, module: nn.Module | None, what: str) -> str:
    if module is None:
        raise ValueError(f"{type(h.root).__name__} has no {what}: this intervention acts on it")
    return path_of(h, module)


# --------------------------------------------------------------------------- running


def run(h: Handles, **inputs: Any) -> Any:
    """One forward of ``h``'s model on ``inputs`` (keyword arguments of its forward),
    applying every intervention active in this thread. Returns the model's output, or
    ``None`` when a :func:`stop_after` ended it early. Without interventions it is a
    plain call. Every forward gradlocate makes goes through here, so an intervention
    active around any gradlocate function applies to all of its forwards."""
    s = _session(h)
    s.running += 1
    try:
        return _traced(h, s, inputs) if s.events else h.root(**inputs)
    finally:
        s.running -= 1


def _traced(h: Handles, s: _Session, inputs: dict[str, Any]) -> Any:
    """The forward through nnsight, each active intervention applied at its module."""
    groups: dict[tuple[str, bool], list[_Event]] = {}
    for e in s.events:
        groups.setdefault((e.path, e.before), []).append(e)
    steps = sorted(groups.items(), key=lambda kv: _keys(h, kv[0][0])[0 if kv[0][1] else 1])
    stops = any(e.phase == "stop" for e in s.events)
    env = s.envoy
    out = None
    # nnsight compiles this block's body and runs it beside the forward, which waits at
    # each module the body asks for: the steps are in the forward's order.
    with env.trace(**inputs) as tracer:
        for (path, before), evs in steps:
            _apply(env.get(path), before, evs, tracer)
        if not stops:
            out = env.output.save()
    return out


def _apply(m: Any, before: bool, evs: list[_Event], tracer: Any) -> None:
    if before:
        args, kwargs = m.inputs
        for e in evs:
            if e.phase == "input":
                args, kwargs = e.fn(args, kwargs)
        m.inputs = (args, kwargs)
        skips = [e for e in evs if e.phase == "skip"]
        if skips:
            m.skip(skips[-1].fn(args, kwargs))
        return
    value, changed = m.output, False
    for e in evs:
        if e.phase == "output":
            new = e.fn(value)
            if new is not None:
                value, changed = new, True
    if changed:
        m.output = value
    if any(e.phase == "stop" for e in evs):
        tracer.stop()


# --------------------------------------------------------------------------- tools


def no_cache(root: nn.Module) -> dict[str, Any]:
    """``{"use_cache": False}`` for a model whose forward takes a key/value cache (one
    forward does not need one), else ``{}`` (a plain torch LM may take neither)."""
    return {"use_cache": False} if _compat.cache_argument(root) else {}


def states(output: Any, rows: int | None = None) -> Float[Tensor, "rows pos features"] | Float[Tensor, "_ features"]:
    """The state tensor of a module's output as ``[rows, pos, d]`` (a view: writing into
    it edits the output). Blocks return a tensor or a tuple led by it; OPT's MLP works on
    flattened ``[rows * pos, d]`` states, reshaped with ``rows`` (left flat without it)."""
    t = output[0] if isinstance(output, (tuple, list)) else output
    if t.dim() == 2 and rows is not None:
        return t.view(rows, -1, t.shape[-1])
    return t


def rewrappable(output: Any) -> bool:
    """Whether a block output is something a skipped block can stand in for: a tensor,
    or a tuple led by one whose other items are ``None`` (real extras, e.g. attention
    weights, cannot be reproduced)."""
    return isinstance(output, Tensor) or (isinstance(output, tuple) and bool(output)
                                          and isinstance(output[0], Tensor) and all(x is None for x in output[1:]))


def rewrap(like: Any, hidden: Float[Tensor, "rows pos features"]) -> Any:
    """``hidden`` in the structure of the block output ``like`` (see :func:`rewrappable`)."""
    return hidden if isinstance(like, Tensor) else (hidden, *like[1:])


@dataclass
class Capture:
    """What :func:`capture` recorded: per module path, its output states (``outputs``)
    and first inputs (``inputs``) of the last forward, attached to the autograd graph
    unless ``detach``."""

    outputs: dict[str, Tensor] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def grads(self, loss: Tensor, paths: Sequence[str]) -> list[Tensor]:
        """``d loss / d output`` of each path's captured output (``torch.autograd.grad``
        into the activations only: no weight gets a ``.grad``)."""
        return list(torch.autograd.grad(loss, [self.outputs[p] for p in paths]))


@contextlib.contextmanager
def capture(h: Handles, paths: Sequence[str], *, inputs: bool = False, outputs: bool = True,
            detach: bool = False) -> Iterator[Capture]:
    """Record the outputs (and with ``inputs=True`` the first inputs) of the modules at
    ``paths`` in every forward run inside the block; the last forward's are kept. A
    module returning a tuple is recorded by its first item (``raw`` keeps the whole
    output). States stay as the module made them: OPT's MLP works on flattened
    ``[rows * pos, d]`` states (see :func:`states`)."""
    cap = Capture()

    def take(t: Tensor) -> Tensor:
        return t.detach().clone() if detach else t

    def rec_out(p: str) -> Callable[[Any], None]:
        def fn(o: Any) -> None:
            cap.raw[p] = o
            cap.outputs[p] = take(states(o))
        return fn

    def rec_in(p: str) -> Callable[[tuple, dict], tuple]:
        def fn(args: tuple, kwargs: dict) -> tuple:
            x = args[0] if args else next(iter(kwargs.values()))
            cap.inputs[p] = take(x)
            return args, kwargs
        return fn

    events = [_Event(p, "output", rec_out(p)) for p in paths if outputs]
    events += [_Event(p, "input", rec_in(p)) for p in paths if inputs]
    with _registered(h, events):
        yield cap


@contextlib.contextmanager
def replaced(h: Handles, path: str, fn: Callable[[Any], Any]) -> Iterator[None]:
    """The output of the module at ``path`` becomes ``fn(output)`` in the forwards
    inside the block (``fn`` may also edit the output in place and return ``None``)."""
    with _registered(h, [_Event(path, "output", fn)]):
        yield


@contextlib.contextmanager
def edited(h: Handles, path: str, fn: Callable[[Float[Tensor, "rows pos d_in"], Any], Any]) -> Iterator[None]:
    """The output of the module at ``path`` becomes ``fn(input, output)`` (its first
    input), e.g. ``output + x @ delta[row].T``: a weight change per batch row, with no copy
    of the model."""
    seen: dict[str, Tensor] = {}

    def keep(args: tuple, kwargs: dict) -> tuple:
        seen["x"] = args[0] if args else next(iter(kwargs.values()))
        return args, kwargs

    with _registered(h, [_Event(path, "input", keep), _Event(path, "output", lambda out: fn(seen.pop("x"), out))]):
        yield


@contextlib.contextmanager
def noised(h: Handles, noise: Float[Tensor, "rows subject d_model"], start: int) -> Iterator[None]:
    """Add ``noise`` to the input embeddings at positions ``start .. start + n``
    (causal tracing's corruption of the subject tokens)."""
    def add(out: Tensor) -> Tensor:
        out = out.clone()
        out[:, start:start + noise.shape[1]] += noise.to(out.dtype)
        return out

    with replaced(h, _path_of_required(h, h.embed, "input embedding (get_input_embeddings())"), add):
        yield


@dataclass(frozen=True)
class Patch:
    """Clean states to write into one module's output: ``values[k]`` at row ``rows[k]``,
    position ``pos[k]``."""

    rows: Int[Tensor, " k"]
    pos: Int[Tensor, " k"]
    values: Float[Tensor, "k d_model"]


@contextlib.contextmanager
def restored(h: Handles, patches: dict[str, Patch], rows: int | None = None) -> Iterator[None]:
    """Write ``patches[path].values`` at (row, position) of each module's output in the
    forwards inside the block (ROME's restoration of clean states)."""
    def write(p: Patch) -> Callable[[Any], None]:
        def fn(out: Any) -> None:
            st = states(out, rows)
            st[p.rows.to(st.device), p.pos.to(st.device)] = p.values.to(st.dtype)
        return fn

    with _registered(h, [_Event(path, "output", write(p)) for path, p in patches.items()]):
        yield


@contextlib.contextmanager
def from_layer(h: Handles, layer: int, state: Callable[[], Any]) -> Iterator[None]:
    """Blocks ``0 .. layer - 1`` do not run: block ``layer - 1`` returns ``state()`` (the
    residual stream entering block ``layer``, shaped like a block's output) and the ones
    below pass their input through. Layers that never change need not be recomputed."""
    if layer <= 0:
        yield
        return

    def passthrough(args: tuple, kwargs: dict) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    events = [_Event(h.block_paths[j], "skip", passthrough) for j in range(layer - 1)]
    events.append(_Event(h.block_paths[layer - 1], "skip", lambda args, kwargs: state()))
    with _registered(h, events):
        yield


@contextlib.contextmanager
def head_at(h: Handles, rows: Int[Tensor, " k"], pos: Int[Tensor, " k"], *,
            skip: Callable[[Float[Tensor, "k d_model"]], Any] | None = None) -> Iterator[None]:
    """The LM head sees only the hidden states at ``(rows, pos)``, as one row
    ``[1, k, d]``: the model's logits come out ``[1, k, vocab]``. An edit scores a few
    target tokens of a longer sequence; the rest of the vocabulary projection is waste.
    With ``skip``, the head does not run at all: ``skip(states)`` gets those states and
    returns what stands in for the logits (a fused loss reads the head's weight itself)."""
    def gather(args: tuple, kwargs: dict) -> tuple:
        x = args[0] if args else kwargs.pop("input")
        x = x[rows.to(x.device), pos.to(x.device)][None]
        return (x, *args[1:]), kwargs

    path = _path_of_required(h, h.head, "LM head (get_output_embeddings())")
    events = [_Event(path, "input", gather)]
    if skip is not None:
        events.append(_Event(path, "skip", lambda args, kwargs: skip(args[0][0])))
    with _registered(h, events):
        yield


@contextlib.contextmanager
def stop_after(h: Handles, path: str) -> Iterator[None]:
    """The forward ends once the module at ``path`` has run (:func:`run` returns ``None``)."""
    with _registered(h, [_Event(path, "stop", lambda o: None)]):
        yield


@contextlib.contextmanager
def instrumented(model: nn.Module) -> Iterator[Any]:
    """A plain nnsight wrapper of ``model`` for the block, then every forward nnsight
    installed is removed, so the model is exactly as before.

    Example:
        >>> from gradlocate.models import tiny
        >>> model, _ = tiny("gpt2", n_layers=1)
        >>> with instrumented(model) as traced:
        ...     pass
        >>> any("forward" in m.__dict__ for m in model.modules())
        False
    """
    from nnsight import NNsight

    had = _compat.instrumentation(model)
    try:
        yield NNsight(model)
    finally:
        _compat.uninstrument(model, had)
