"""Typed settings of the editors: one frozen dataclass per editor, defaults with their sources.

Every editor takes its settings as one object (EasyEdit's idea of a typed hparams class
per method, without its per-model files that bake in module paths and layers: here the
site is found structurally and the layer is an argument):

    LocFTSettings(lr=5e-4, epochs=25, ...)        LocFT-BF (ICT-STAR/LocFT's hparams)
    ROMESettings(v_num_grad_steps=25, ...)        ROME / R-ROME (EasyEdit's LLaMA files)
    EMMETSettings(emmet_lambda=0.1, ...)          EMMET

A setting's default and where it comes from are in the field's metadata
(:meth:`Settings.sources`). Settings are built from a dict (:meth:`Settings.from_dict`:
unknown names refused by name), from ``NAME=VALUE`` strings (:meth:`Settings.parse`,
the CLI's ``--set``) or from an EasyEdit hparams YAML (:meth:`Settings.from_yaml`:
the structural keys EasyEdit needs - module templates, layers, devices - are set aside
and listed, any other unknown key is refused by name). :meth:`Settings.to_dict` is what
a record's fingerprint digests.

Example:
    >>> s = LocFTSettings().replace(lr=1e-3)
    >>> s.lr, s.epochs, s.overrides()
    (0.001, 25, {'lr': 0.001})
    >>> LocFTSettings.from_dict({"lr": 1e-3, "epoch": 5})
    Traceback (most recent call last):
    ...
    gradlocate.editors.settings.SettingsError: LocFT-BF has no setting 'epoch' (did you mean 'epochs'?); its settings: append_eos, cache, cache_budget, edits_per_step, epochs, head, loss_threshold, lr, seed
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

from gradlocate.losses import APPEND_EOS

__all__ = ["Settings", "LocFTSettings", "ROMESettings", "EMMETSettings", "SettingsError", "STRUCTURAL_KEYS",
           "DEFAULT_MOM2_TOKENS"]

S = TypeVar("S", bound="Settings")

#: EasyEdit hparams keys that name model structure, devices or data locations: gradlocate
#: finds the site structurally and takes the layer as an argument, so these are set aside
#: (and listed) when a YAML file is read, never applied.
STRUCTURAL_KEYS = frozenset({
    "alg_name", "model_name", "device", "model_parallel", "fp16", "bf16", "layers", "rewrite_module_tmp",
    "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module", "v_loss_layer",
    "stats_dir", "max_length", "mom2_dataset", "mom2_n_samples", "mom2_dtype", "fact_token", "batch_size",
    "enable_prompt_keys", "enable_random_prefix_keys", "original_implementation", "results_dir",
})
#: The second-moment statistics' default size: docs/rome.md's ablation found rewrite and
#: locality unchanged between 10k, 50k and 200k tokens on SmolLM2, so the smallest size
#: that left them unchanged, with margin, is the default (raise it with mom2_n_tokens).
DEFAULT_MOM2_TOKENS = 20_000


class SettingsError(ValueError):
    """A setting that does not exist or has a value of the wrong kind (the message names it)."""


def _src(source: str, doc: str) -> dict[str, str]:
    return {"source": source, "doc": doc}


@dataclass(frozen=True)
class Settings:
    """Base of every editor's settings (a frozen dataclass; see the module doc)."""

    #: The editor's display name, used in messages.
    editor_name: ClassVar[str] = "editor"
    #: EasyEdit key -> our field name, where they spell a setting differently.
    aliases: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`SettingsError` naming the first bad value (subclasses add their rules)."""

    # -- construction
    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any] | None = None) -> S:
        """Settings from ``{name: value}`` (defaults for the rest); an unknown name is refused."""
        values = dict(values or {})
        cls._known(values)
        return cls(**{k: cls._coerce(k, v) for k, v in values.items()})

    @classmethod
    def _known(cls, names: Any) -> None:
        known = {f.name for f in fields(cls)}
        for k in names:
            if k not in known:
                near = difflib.get_close_matches(k, known, 1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise SettingsError(f"{cls.editor_name} has no setting {k!r}{hint}; its settings: "
                                    f"{', '.join(sorted(known))}")

    @classmethod
    def parse(cls: type[S], items: Sequence[str], base: S | None = None) -> S:
        """``base`` (default: the defaults) with ``NAME=VALUE`` items applied (values parsed
        as JSON where they parse: numbers, booleans, lists; else kept as strings).

        Example:
            >>> ROMESettings.parse(["v_num_grad_steps=40", "mom2_corpus=sampled"]).v_num_grad_steps
            40
        """
        out: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            if not sep or not name.strip():
                raise SettingsError(f"{item!r}: expected NAME=VALUE, e.g. lr=1e-4")
            try:
                out[name.strip()] = json.loads(text)
            except json.JSONDecodeError:
                out[name.strip()] = text
        start = base.to_dict() if base is not None else {}
        return cls.from_dict({**start, **out})

    @classmethod
    def from_yaml(cls: type[S], path: str | os.PathLike[str]) -> tuple[S, dict[str, Any]]:
        """Settings from an EasyEdit hparams YAML file, and the structural keys set aside
        (:data:`STRUCTURAL_KEYS`: module templates, layers, devices, data locations).

        Raises:
            SettingsError: a key that is neither a setting of this editor nor structural.
        """
        import yaml

        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise SettingsError(f"{path}: expected a mapping of hparams, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        mine = {cls.aliases.get(k, k): v for k, v in raw.items() if cls.aliases.get(k, k) in known}
        aside = {k: v for k, v in raw.items() if k in STRUCTURAL_KEYS and cls.aliases.get(k, k) not in known}
        bad = sorted(set(raw) - set(aside) - {k for k in raw if cls.aliases.get(k, k) in known})
        if bad:
            raise SettingsError(f"{path}: {cls.editor_name} has no setting {', '.join(map(repr, bad))} "
                                f"(its settings: {', '.join(sorted(known))})")
        return cls.from_dict(mine), aside

    @classmethod
    def _coerce(cls, name: str, value: Any) -> Any:
        """JSON and YAML give lists where a setting holds tuples."""
        default = next(f for f in fields(cls) if f.name == name).default
        if isinstance(default, tuple) and isinstance(value, list):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        return value

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes`` (checked as :meth:`from_dict` checks them)."""
        if not changes:
            return self
        self._known(changes)
        return replace(self, **{k: self._coerce(k, v) for k, v in changes.items()})

    # -- reading
    def to_dict(self) -> dict[str, Any]:
        """Every setting, JSON-ready (tuples as lists): what a fingerprint digests."""
        return json.loads(json.dumps(asdict(self)))

    def overrides(self) -> dict[str, Any]:
        """The settings that differ from the defaults."""
        base = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if base.get(k) != v}

    @classmethod
    def sources(cls) -> dict[str, dict[str, Any]]:
        """Each setting's default, where it comes from and what it does."""
        return {f.name: {"default": None if f.default is MISSING else f.default, **dict(f.metadata)}
                for f in fields(cls)}

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.overrides().items())
        return f"{type(self).__name__}({changed or 'defaults'})"


def _positive(s: Settings, *names: str, integer: bool = False, zero: bool = False) -> None:
    for name in names:
        v = getattr(s, name)
        kind = numbers.Integral if integer else numbers.Real
        ok = isinstance(v, kind) and not isinstance(v, bool) and (integer or math.isfinite(v))
        if not ok or (v < 0 if zero else v <= 0):
            what = "an int" if integer else "a finite number"
            raise SettingsError(f"{s.editor_name}: {name} must be {what} {'>= 0' if zero else '> 0'}, got {v!r}")


def _choice(s: Settings, name: str, allowed: Sequence[Any]) -> None:
    v = getattr(s, name)
    if not any(v is a or (v == a and type(v) is type(a)) for a in allowed):
        raise SettingsError(f"{s.editor_name}: {name} must be one of {list(allowed)}, got {v!r}")


_LOCFT = "ICT-STAR/LocFT hparams/*.yaml (Yang et al. 2025)"


@dataclass(frozen=True, repr=False)
class LocFTSettings(Settings):
    """LocFT-BF's settings (:class:`~gradlocate.editors.locft.LocFTBF`)."""

    editor_name: ClassVar[str] = "LocFT-BF"
    aliases: ClassVar[Mapping[str, str]] = {"num_steps": "epochs"}

    lr: float = field(default=5e-4, metadata=_src(_LOCFT, "Adam learning rate (weight decay 0)"))
    epochs: int = field(default=25, metadata=_src(_LOCFT, "maximum sweeps over the edits"))
    edits_per_step: int | None = field(default=None, metadata=_src(
        "gradlocate: auto_edits_per_step (the paper's 100, shrunk to >= 8 steps per epoch)", "edits per step"))
    append_eos: bool = field(default=APPEND_EOS, metadata=_src(_LOCFT, "score EOS after each target"))
    seed: int = field(default=0, metadata=_src("gradlocate", "seeds the per-epoch shuffles"))
    loss_threshold: float = field(default=1e-2, metadata=_src(_LOCFT, "no step below it; stop after an epoch below it"))
    cache: bool | str = field(default="auto", metadata=_src("gradlocate", "activation cache: auto, True, False"))
    cache_budget: int = field(default=2 * 1024**3, metadata=_src("gradlocate", "bytes the cache may take (auto)"))
    head: str = field(default="auto", metadata=_src("gradlocate", "LM head: auto, fused, select, full"))

    def check(self) -> None:
        _positive(self, "lr")
        _positive(self, "epochs", integer=True)
        if self.edits_per_step is not None:
            _positive(self, "edits_per_step", integer=True)
        _positive(self, "loss_threshold", zero=True)
        _positive(self, "cache_budget", "seed", integer=True, zero=True)
        _choice(self, "append_eos", [True, False])
        _choice(self, "cache", ["auto", True, False])
        _choice(self, "head", ["auto", "fused", "select", "full"])


_EASYEDIT = "EasyEdit hparams/ROME/llama3.2-1b.yaml"


@dataclass(frozen=True, repr=False)
class ROMESettings(Settings):
    """ROME's and R-ROME's settings (:class:`~gradlocate.editors.rome.ROME`). ``mom2_adjustment``
    is on (ROME's paper and its gpt2-xl files; EasyEdit's LLaMA file turns it off, but the
    C⁻¹ weighting is the method)."""

    editor_name: ClassVar[str] = "ROME"

    v_num_grad_steps: int = field(default=25, metadata=_src(_EASYEDIT, "v* optimisation steps"))
    v_lr: float = field(default=0.5, metadata=_src(_EASYEDIT, "v* Adam learning rate"))
    v_weight_decay: float = field(default=1e-3, metadata=_src(_EASYEDIT, "weight decay on ‖δ‖"))
    clamp_norm_factor: float = field(default=4.0, metadata=_src(_EASYEDIT, "‖δ‖ <= factor · ‖v_init‖"))
    kl_factor: float = field(default=0.0625, metadata=_src(_EASYEDIT, "weight of the essence KL term"))
    mom2_adjustment: bool = field(default=True, metadata=_src("ROME (Meng et al. 2022)", "weigh the update by C⁻¹"))
    mom2_n_tokens: int = field(default=DEFAULT_MOM2_TOKENS, metadata=_src(
        "gradlocate: docs/rome.md's ablation (rewrite unchanged 10k/50k/200k)", "tokens of the second moment C"))
    mom2_corpus: str = field(default="sampled", metadata=_src(
        "gradlocate (offline): the model's own text",
        "C's corpus: 'sampled', a .txt/.json/.jsonl file, a datasets folder, 'wikitext' or owner/name[:config]"))
    mom2_stats: str | None = field(default=None, metadata=_src(
        "ROME / EasyEdit", "a ROME/EasyEdit stats .npz file or stats folder to read C from (checked for shape)"))
    context_template_length_params: tuple[tuple[int, int], ...] = field(default=((5, 10), (10, 10)), metadata=_src(
        "ROME rome_main.get_context_templates", "(tokens, count) of the sampled context prefixes"))
    mom2_seed: int = field(default=0, metadata=_src("gradlocate", "seeds C's sampled corpus"))
    seed: int = field(default=0, metadata=_src("gradlocate", "seeds the context templates (the replicate seed)"))

    def check(self) -> None:
        _positive(self, "v_lr", "clamp_norm_factor")
        _positive(self, "v_weight_decay", "kl_factor", zero=True)
        _positive(self, "v_num_grad_steps", "mom2_n_tokens", integer=True)
        _positive(self, "seed", "mom2_seed", integer=True, zero=True)
        _choice(self, "mom2_adjustment", [True, False])
        if not isinstance(self.mom2_corpus, str) or not self.mom2_corpus:
            raise SettingsError(f"{self.editor_name}: mom2_corpus must be 'sampled', a file or a dataset name, "
                                f"got {self.mom2_corpus!r}")
        for pair in self.context_template_length_params:
            if len(pair) != 2 or not all(isinstance(x, int) and x >= 1 for x in pair):
                raise SettingsError(f"{self.editor_name}: context_template_length_params holds (length, count) "
                                    f"pairs of ints >= 1, got {pair!r}")


@dataclass(frozen=True, repr=False)
class EMMETSettings(ROMESettings):
    """EMMET's settings (:class:`~gradlocate.editors.emmet.EMMET`): ROME's, plus the batch
    update's λs, with EasyEdit's ``hparams/EMMET/llama3.2-3b.yaml`` templates and λ (and
    ``mom2_update_weight`` 1, as its gpt2-xl file: see :mod:`gradlocate.editors.emmet`)."""

    editor_name: ClassVar[str] = "EMMET"

    mom2_update_weight: float = field(default=1.0, metadata=_src("EasyEdit hparams/EMMET/gpt2-xl.yaml",
                                                                 "C's scale (matters only through λ)"))
    emmet_lambda: float = field(default=0.1, metadata=_src("EasyEdit hparams/EMMET/llama3.2-3b.yaml",
                                                           "λ regularising K C⁻¹ Kᵀ"))
    update_norm_lambda: float = field(default=0.0, metadata=_src("EasyEdit", "λ on ‖ΔW‖ (added to C)"))
    context_template_length_params: tuple[tuple[int, int], ...] = field(default=((10, 5),), metadata=_src(
        "EMMET emmet_main.get_context_templates", "(tokens, count) of the sampled context prefixes"))

    def check(self) -> None:
        super().check()
        _positive(self, "mom2_update_weight")
        _positive(self, "emmet_lambda", "update_norm_lambda", zero=True)
