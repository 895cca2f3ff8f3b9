"""One definition of LoRAtorio's settings, shared by the UI, the API's named arguments and the infotext."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loratorio.core.modes import MODES

REFERENCES = ("cond", "uncond")
EVALUATIONS = ("auto", "batched", "sequential")
SPEEDS = ("full", "fast")

INFOTEXT_PREFIX = "LoRAtorio"
T = TypeVar("T")


def _spec(label: str, *, lo: float | None = None, hi: float | None = None, choices: tuple[str, ...] = (),
          help: str = "") -> dict[str, Any]:
    return {"label": label, "lo": lo, "hi": hi, "choices": choices, "help": help}


@dataclass(frozen=True)
class Settings:
    """LoRAtorio's settings; field names are the API's named keys. Defaults are justified in the README."""

    enabled: bool = field(default=False, metadata=_spec("enabled", help="Compose the prompt's LoRAs with LoRAtorio."))
    mode: str = field(default="loratorio", metadata=_spec(
        "mode", choices=MODES, help="loratorio: per-patch SoftMin fusion; composite: mean of the LoRAs; "
        "switch: one LoRA per window of steps."))
    patch_size: int = field(default=8, metadata=_spec(
        "patch size", lo=1, hi=128, help="Side of a latent patch, in latent pixels (8 px of image each)."))
    temperature: float = field(default=0.05, metadata=_spec(
        "temperature", lo=1e-4, hi=10.0, help="SoftMin temperature τ: smaller makes each patch's winner take more."))
    recentre: float = field(default=0.5, metadata=_spec(
        "recentre", lo=0.0, hi=1.0, help="λ: how far the fused negative is pulled back to the base model's."))
    top_k: int = field(default=0, metadata=_spec(
        "top k", lo=0, hi=64, help="Dynamic mode: keep only the k most divergent LoRAs per patch (0 = all)."))
    reference: str = field(default="cond", metadata=_spec(
        "reference", choices=REFERENCES, help="Which base prediction the LoRAs are compared with."))
    evaluation: str = field(default="auto", metadata=_spec(
        "evaluation", choices=EVALUATIONS, help="batched: one UNet call for base and all LoRAs; sequential: one "
        "call per LoRA, for hooks that need the host's batch shape; auto: batched unless a known hook objects."))
    switch_interval: int = field(default=5, metadata=_spec(
        "switch interval", lo=1, hi=1000, help="Switch mode: steps each LoRA stays active."))
    start: float = field(default=0.0, metadata=_spec(
        "start", lo=0.0, hi=1.0, help="Fraction of sampling at which composition starts (plain sampling before)."))
    end: float = field(default=1.0, metadata=_spec(
        "end", lo=0.0, hi=1.0, help="Fraction of sampling at which composition ends (plain sampling after)."))
    show_maps: bool = field(default=False, metadata=_spec(
        "show maps", help="Add one image per LoRA to the results, showing where it won."))

    # Added after show_maps so that the API's positional order of the earlier fields stays stable.
    reuse: int = field(default=0, metadata=_spec(
        "reuse steps", lo=0, hi=100, help="Keep the patch weights for this many steps after computing them (0 = "
        "every step). Saves the similarity, and with recentre 0 also the base model's evaluation on those steps."))

    # Added after reuse, in this order (the API's positional order).
    speed: str = field(default="full", metadata=_spec(
        "speed", choices=SPEEDS, help="full: base and every LoRA evaluated at every step; fast: only every 'full "
        "every' steps, and in between one pass at about plain LoRA's cost, each LoRA applied where the weight map "
        "gives it. Measured as good as full with LoRAs that fight when merged; with LoRAs that merge cleanly it can "
        "lose a style LoRA (README, Speed fast)."))
    # 6: on the miniature's tuning half (fast − full, weak / strong): 4 +0.007 / −0.043, 5 – / −0.025, 6 +0.029 /
    # −0.020, 7 +0.042 / −0.031, 8 +0.070 / −0.053; 6 is the one within 0.02 of full LoRAtorio in both regimes, and at
    # N = 3 it costs under 1.5× plain LoRA (README, Performance). 8 until the strong regime's LoRAs were retrained.
    # With 12 seeds per set: tuning half +0.022 / −0.017; test half −0.103 / −0.004 (the weak regime loses a style).
    full_every: int = field(default=6, metadata=_spec(
        "full every", lo=1, hi=100, help="Fast speed: evaluate base and every LoRA (and renew the weight map) every "
        "this many steps; 1 = always, as full speed."))
    # Then, in this order: the composition options measured on the miniature's two regimes.
    global_loras: str = field(default="", metadata=_spec(
        "global LoRAs", help="Comma-separated LoRA names merged into the model for the whole image (e.g. a style) "
        "instead of competing per patch; the others are composed."))
    min_share: float = field(default=0.0, metadata=_spec(
        "min share", lo=0.0, hi=1.0, help="Coverage floor: every composed LoRA keeps at least this mean weight over "
        "the image (capped at 1/N), so that no requested LoRA is lost (0 = off)."))
    auto_global: float = field(default=0.0, metadata=_spec(
        "auto global", lo=0.0, hi=10.0, help="Make a LoRA global (as in 'global LoRAs') when its divergence from the "
        "base is spread evenly over the image at the first step: spread (std/mean over patches) below this value "
        "(0 = off; with speed fast, 0 uses fast mode's own 0.5)."))
    temperature_end: float = field(default=0.0, metadata=_spec(
        "temperature end", lo=0.0, hi=10.0, help="Temperature at the last step; τ moves geometrically from "
        "'temperature' to it over the steps (0 = constant τ)."))
    # On by default: chosen on the miniature's tuning half, where it kept the most skills in both regimes (README).
    relative: bool = field(default=True, metadata=_spec(
        "relative", help="Compare each LoRA's divergence with its own average over the image, so that a small "
        "skill wins where it stands out instead of losing every patch to a large one."))
    # Off by default: 0.8 gained with the shipped strong LoRAs (tuning and test half) and was neutral-to-negative with
    # weak ones and with reliable character LoRAs (README, Which options were kept).
    smoothing: float = field(default=0.0, metadata=_spec(
        "smoothing", lo=0.0, hi=0.99, help="Blend each step's weight map with the previous step's, this much of the "
        "past: a patch keeps its LoRA from step to step instead of flipping between them (0 = off; not used by "
        "speed fast)."))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.start >= self.end:
            raise ValueError(f"LoRAtorio setting 'start' ({self.start}) must be less than 'end' ({self.end})")

    def global_list(self) -> tuple[str, ...]:
        """The names in `global_loras`, stripped and lower-cased (hosts compare LoRA names case-insensitively)."""
        return tuple(n.strip().lower() for n in self.global_loras.split(",") if n.strip())

    def split_globals(self, items: Sequence[T], names: Callable[[T], Iterable[str]]
                      ) -> tuple[list[T], list[T], list[str]]:
        """(global items, composed items, `global_loras` names matching no item); `names` gives an item's names."""
        wanted = self.global_list()
        known = [{str(n).lower() for n in names(item) if n} for item in items]
        glob = [item for item, k in zip(items, known, strict=True) if k.intersection(wanted)]
        rest = [item for item, k in zip(items, known, strict=True) if not k.intersection(wanted)]
        return glob, rest, [w for w in wanted if not any(w in k for k in known)]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of named settings, as the API's named form takes them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Settings:
        """Build from named settings (API dict form); missing keys take defaults, unknown keys are an error."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown LoRAtorio setting(s) {unknown}; allowed: {sorted(names)}")
        return cls(**{k: _coerce(names[k], v) for k, v in values.items()})

    def to_infotext(self) -> dict[str, str]:
        """Infotext key/values (generation parameters); empty when disabled, so plain runs stay untouched."""
        if not self.enabled:
            return {}
        # An empty value is left out: A1111's infotext parser reports "Error parsing" for "key: " (its default,
        # the empty string, is what an absent key restores anyway).
        return {infotext_key(f): _format(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("enabled", "show_maps") and getattr(self, f.name) != ""}

    @classmethod
    def from_infotext(cls, params: Mapping[str, Any]) -> Settings:
        """Inverse of to_infotext: settings from parsed generation parameters (absent keys: disabled/defaults)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = infotext_key(f)
            if key in params:
                values[f.name] = params[key]
        if not values:
            return cls()
        return cls.from_dict({**LEGACY, **values, "enabled": True})


ARG_ORDER = tuple(f.name for f in dataclasses.fields(Settings))
# Settings whose default changed: an infotext written before they existed meant these values, so restoring it (PNG
# Info) reproduces that image instead of switching the option on.
LEGACY: dict[str, Any] = {"relative": False}


class SettingsError(ValueError):
    """A request refused for a bad LoRAtorio setting. The WebUIs' API answers with an exception's own `status_code`
    (api.py: `vars(e).get('status_code', 500)`), so the client gets 422 and the message, not a server error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.status_code = 422


def settings_from_args(args: Sequence[Any]) -> Settings:
    """A script's args: the positional UI order (ARG_ORDER), or one dict of named settings (API named form)."""
    if args and isinstance(args[0], Mapping):
        return Settings.from_dict(args[0])
    if len(args) > len(ARG_ORDER):
        raise ValueError(f"LoRAtorio takes at most {len(ARG_ORDER)} positional args {list(ARG_ORDER)}, "
                         f"got {len(args)}")
    return Settings.from_dict(dict(zip(ARG_ORDER, args, strict=False)))


def field_value(name: str, value: Any) -> Any:
    """One setting's value, coerced and range-checked on its own (rules across fields apply when Settings is built)."""
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    if name not in fields:
        raise ValueError(f"unknown LoRAtorio setting {name!r}; allowed: {sorted(fields)}")
    value = _coerce(fields[name], value)
    _check(fields[name], value)
    return value


def infotext_key(f: dataclasses.Field) -> str:
    """The generation-parameters key of a settings field, e.g. 'LoRAtorio patch size'."""
    return f"{INFOTEXT_PREFIX} {f.metadata['label']}"


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Accept the value types that JSON, Gradio and infotext strings carry; refuse anything ambiguous."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "bool":
            if isinstance(value, str) and value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            if isinstance(value, bool):
                return value
        elif kind == "int" and not isinstance(value, bool):
            number = float(value)
            if number.is_integer():
                return int(number)
        elif kind == "float" and not isinstance(value, bool):
            return float(value)
        elif kind == "str" and isinstance(value, str):
            return value.strip().lower()
    except (TypeError, ValueError):
        pass
    raise ValueError(f"LoRAtorio setting {f.name!r} must be a {kind}, got {value!r}")


def _check(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    ok_type = {"bool": bool, "int": int, "float": (int, float), "str": str}[kind]
    if not isinstance(value, ok_type) or (kind != "bool" and isinstance(value, bool)):
        raise ValueError(f"LoRAtorio setting {f.name!r} must be a {kind}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"LoRAtorio setting {f.name!r} must be one of {list(meta['choices'])}, got {value!r}")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and not lo <= value <= hi:
        raise ValueError(f"LoRAtorio setting {f.name!r} must be in [{lo}, {hi}], got {value!r}")
