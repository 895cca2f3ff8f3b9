"""Forge 2.x and reForge glue: the host's per-file LoRA patches as routed adapters on a cloned UnetPatcher.

How a step runs (design/forge.md §1.2, §3.3):
1. `install` clones the UnetPatcher, strips its LoRA patches (the clone loads with base weights), hooks the UNet's
   targeted layers, and chains three model_options entries on the clone: a conditioning modifier (opens the step),
   the model_function_wrapper (evaluates base + every LoRA on each chunk the host batches, fuses cond chunks) and the
   sampler_cfg_function (swaps in the re-centred uncond, then the host's own CFG or the previous cfg function).
2. Cond and uncond chunks may come in separate calls and in either order; the uncond is fused with the weights of
   the prompt's first sub-prompt once both are known, at the latest in the cfg function, so the result is exact.
3. Rows outside the composition window, or after a failure, go through every LoRA at once: the host's merge.
Host functions come in through `Backend`, host objects through `p`, so tests drive this with fakes.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from loratorio.core import (
    Adapter,
    BatchLayout,
    Bias,
    Callback,
    Chain,
    Composer,
    Dense,
    LoHa,
    LoKr,
    LowRank,
    Materialized,
    MemoryBudget,
    MultiAdapter,
    NormDelta,
    Rescaled,
    Settings,
    SettingsError,
    in_window,
    merged_weight,
    tree_map,
)
from loratorio.hosts.checks import dry_run, inject_fault
from loratorio.maps import accumulate

log = logging.getLogger(__name__)

KEY = "loratorio"
PREFIX = "diffusion_model."
_MISSING = object()
# model_options entries we set; restored when our own clone is cloned again (Forge's first hires call).
_OPTIONS = ("model_function_wrapper", "sampler_cfg_function")


class Declined(Exception):
    """LoRAtorio cannot run this generation; the message says why, and sampling goes on normally."""


@dataclass(frozen=True)
class LoraSource:
    """One prompt LoRA as the host merged it: {parameter key: host patch entries} at its UNet multiplier."""

    name: str
    mentioned_name: str
    filename: str
    multiplier: float
    patches: dict


@dataclass(frozen=True)
class Backend:
    """The host functions the glue needs, injected so that fakes can stand in (forge: lllyasviel 2.x)."""

    kind: str
    merge: Callable[[list, Tensor, str], Tensor]  # the host's "apply these patch entries to this weight"
    load_file: Callable[[str, float], dict] | None = None  # reForge: one file's patches at a multiplier
    free_memory: Callable[[torch.device], int] | None = None  # the memory manager's free bytes on a device
    empty_cache: Callable[[], None] | None = None  # the memory manager's "free the allocator's cache"

    def remerge(self, unet: Any, token: _Token) -> None:
        """Give our clone back the host's LoRA patches and let the host merge them into the weights now."""
        (forge_remerge if self.kind == "forge" else reforge_remerge)(unet, token)


def forge_backend() -> Backend:
    """Forge 2.x: merge_lora_to_weight from backend/patcher/lora.py; per-file patches are on the patcher."""
    from backend import memory_management
    from backend.patcher.lora import merge_lora_to_weight

    return Backend("forge", lambda entries, w, key: merge_lora_to_weight(entries, w, key, torch.float32),
                   free_memory=memory_management.get_free_memory,
                   empty_cache=partial(memory_management.soft_empty_cache, force=True))


# Text-encoder key prefixes of reForge's model_lora_keys_clip (ldm_patched/modules/lora.py).
_TEXT_ENCODER_KEY = re.compile(r"^(lora_(prior_)?te\d*_|text_encoders?(_\d+)?\.)")


def unet_keys_only(state_dict: dict) -> dict:
    """A LoRA file's state dict without its text-encoder keys: our reload is UNet-only (the host's prompt pass has
    already applied the text encoder), and reForge logs "lora key not loaded" for every key its UNet map lacks."""
    return {k: v for k, v in state_dict.items() if not _TEXT_ENCODER_KEY.match(k)}


def reforge_backend(sd_model: Any, networks_module: Any) -> Backend:
    """reForge: patches are merged per key, so each file is reloaded through the host's own loader (lru-cached)."""
    from ldm_patched.modules import model_management
    from ldm_patched.modules.lora import calculate_weight
    from ldm_patched.modules.sd import load_lora_for_models

    def load_file(filename: str, multiplier: float) -> dict:
        state_dict = unet_keys_only(networks_module.load_lora_state_dict(filename))
        patcher, _ = load_lora_for_models(sd_model.forge_objects_original.unet, None, state_dict, multiplier, 0,
                                          filename=filename)
        return patcher.patches

    return Backend("reforge", lambda entries, w, key: calculate_weight(entries, w, key), load_file,
                   model_management.get_free_memory, partial(model_management.soft_empty_cache, force=True))


class _Token:
    """Marks a patcher as ours and remembers what we replaced; deep copies (every clone()) share it."""

    def __init__(self, unet: Any, modifier: Callable, holder: Any) -> None:
        self.options = {k: unet.model_options.get(k, _MISSING) for k in _OPTIONS}
        self.lora_patches = getattr(unet, "lora_patches", None)
        self.patches = getattr(unet, "patches", None)
        self.patches_uuid = getattr(unet, "patches_uuid", None)
        self.modifier, self.holder = modifier, holder

    def __deepcopy__(self, memo: dict) -> _Token:
        return self

    def restore(self, unet: Any) -> None:
        """Undo our install on a clone of our own patcher, so that installing again does not stack."""
        for k, v in self.options.items():
            if v is _MISSING:
                unet.model_options.pop(k, None)
            else:
                unet.model_options[k] = v
        unet.model_options.pop(KEY, None)
        mods = unet.model_options.get("conditioning_modifiers", [])
        unet.model_options["conditioning_modifiers"] = [m for m in mods if m is not self.modifier]
        extra = unet.extra_model_patchers_during_sampling
        unet.extra_model_patchers_during_sampling = [m for m in extra if m is not self.holder]
        if self.lora_patches is not None:
            unet.lora_patches = self.lora_patches
        if self.patches is not None:
            unet.patches, unet.patches_uuid = {k: v[:] for k, v in self.patches.items()}, self.patches_uuid


def forge_remerge(unet: Any, token: _Token) -> None:
    """Forge: the shared LoraLoader re-merges when the patch keys differ from the ones it merged last (ours: none)."""
    unet.lora_patches = token.lora_patches
    unet.refresh_loras()


def reforge_remerge(unet: Any, token: _Token) -> None:
    """reForge: patch_weight_to_device merges each patched key where its weight lives (backing it up as load() does);
    the model is then marked as patched with the host's uuid, so the host's next load sees it as its own."""
    unet.patches, unet.patches_uuid = {k: v[:] for k, v in token.patches.items()}, token.patches_uuid
    for key in unet.patches:
        unet.patch_weight_to_device(key)
    unet.model.current_weight_patches_uuid = unet.patches_uuid


def strip(unet: Any, kind: str, keep: Sequence[LoraSource] = ()) -> None:
    """Drop the clone's LoRA patches but those of the `keep` files (global LoRAs), so that it loads with base
    weights plus the globals merged (the shared loader restores its backups, then merges what is left)."""
    files = {s.filename for s in keep}
    if kind == "forge":
        unet.lora_patches = {k: v for k, v in unet.lora_patches.items() if k[0] in files}
    else:
        # reForge merges every file's patches per key; the globals' are rebuilt from their own files' patches.
        patches: dict = {}
        for source in keep:
            for key, entries in source.patches.items():
                patches.setdefault(key, []).extend(entries)
        # reForge skips re-patching while the uuid matches the merged one (model_patcher.py), so it must change.
        unet.patches, unet.patches_uuid = patches, uuid.uuid4()


def forge_sources(lora_patches: dict, networks_module: Any) -> list[LoraSource]:
    """Forge keeps one entry per file: {(filename, unet_mult, strength_model, online): {key: entries}}."""
    names = _names_by_file(networks_module)
    out = []
    for (filename, multiplier, _, _), patches in lora_patches.items():
        if multiplier != 0 and patches:
            name, mentioned = names.get(filename, (_stem(filename), _stem(filename)))
            out.append(LoraSource(name, mentioned, filename, float(multiplier), patches))
    return out


def reforge_sources(lora_hash: str, backend: Backend, networks_module: Any) -> list[LoraSource]:
    """reForge: the merged targets are `str([[filename, unet_mult, te_mult], ...])` (networks.load_networks)."""
    try:
        targets = ast.literal_eval(lora_hash) if lora_hash else []
        targets = [(str(t[0]), float(t[1])) for t in targets]
    except (ValueError, SyntaxError, TypeError, IndexError) as exc:
        raise Declined(f"could not read reForge's LoRA list ({exc})") from exc
    names = _names_by_file(networks_module)
    out = []
    for filename, multiplier in targets:
        if multiplier != 0:
            patches = backend.load_file(filename, multiplier)
            name, mentioned = names.get(filename, (_stem(filename), _stem(filename)))
            if patches:
                out.append(LoraSource(name, mentioned, filename, multiplier, patches))
    return out


def _names_by_file(networks_module: Any) -> dict[str, tuple[str, str]]:
    nets = getattr(networks_module, "loaded_networks", None) or []
    return {n.network_on_disk.filename: (n.name, n.mentioned_name or n.name) for n in nets}


def _stem(filename: str) -> str:
    return os.path.splitext(os.path.basename(filename))[0]


def low_rank(entries: list) -> list[tuple[LowRank, tuple | None]] | None:
    """Plain LoRA/LoCon entries as LowRank (scale = strength · alpha/rank, as merge_lora_to_weight); else None.

    Each comes with its output slice, `offset` = (0, start, size) or None: a diffusers-format LoRA for Flux has
    separate q, k and v factors that the host's key map puts on slices of one fused qkv weight.
    """
    parts = []
    for entry in entries:
        strength, v, strength_model, offset, function = tuple(entry)[:5]
        if strength_model != 1.0 or function is not None or (offset is not None and offset[0] != 0):
            return None
        patch = patch_value(v)
        if patch is None or patch[0] != "lora":
            return None
        up, down, alpha, mid, dora = patch[1][:5]
        if dora is not None or (len(patch[1]) > 5 and patch[1][5] is not None):
            return None
        alpha = None if alpha is None else float(alpha)
        parts.append((LowRank(down, up, alpha, mid, float(strength)), None if offset is None else tuple(offset)))
    return parts or None


def patch_value(v: Any) -> tuple[str, tuple] | None:
    """A patch as (type, weights): Forge's ("lora", (...)) tuples, a bare (diff,), reForge's weight_adapter objects."""
    if isinstance(v, tuple):
        if len(v) == 1:
            return "diff", v
        if len(v) == 2 and isinstance(v[0], str):
            return v[0], tuple(v[1])
        return None
    name, weights = getattr(v, "name", None), getattr(v, "weights", None)
    if isinstance(name, str) and weights is not None:  # reForge's LoRAAdapter, LoHaAdapter, LoKrAdapter…
        return name, tuple(weights)
    return None  # a nested list (merge these first) or a type we do not know: the host's formula, per run


def _sliced(layer: nn.Module | None, parts: list[tuple[LowRank, tuple | None]], x: Tensor, y: Tensor) -> Tensor:
    """Several low-rank entries on one layer, each added to its slice of the output (channels for a conv)."""
    dim = 1 if isinstance(layer, nn.Conv2d) else -1
    for adapter, offset in parts:
        # narrow() is a view: the in-place add lands in y.
        adapter.apply(layer, x, y if offset is None else y.narrow(dim, offset[1], offset[2]))
    return y


class TensorHolder(nn.Module):
    """The LoRA tensors as one module, so the host's memory manager can count and move them.

    A tensor is recognised by id() only while it is alive, so the holder keeps the tensor itself next to its
    parameter: a temporary's id is reused by the next temporary, and an id-only map handed a freed layer's tensor to
    the next layer (the Forge failure "mat1 and mat2 shapes cannot be multiplied (2x320 and 768x1280)", where
    time_embed.0 got an attn2.to_k delta; layers of equal shapes got wrong deltas silently).
    """

    def __init__(self) -> None:
        super().__init__()
        self.tensors = nn.ParameterList()
        self._seen: dict[int, tuple[Tensor, nn.Parameter]] = {}

    def keep(self, t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if id(t) not in self._seen:
            param = nn.Parameter(t.detach(), requires_grad=False)
            self.tensors.append(param)
            self._seen[id(t)] = (t, param)
        return self._seen[id(t)][1]


def _is_quantized(w: Tensor) -> bool:
    return hasattr(w, "bnb_quantized") or getattr(w, "gguf_cls", None) is not None


_NORMS = (nn.GroupNorm, nn.LayerNorm)


def weight_kind(layer: nn.Module, entry: Any, base: Callable[[], Tensor], holder: TensorHolder) -> Adapter | None:
    """One patch entry on a layer's weight as an adapter kind, by merge_lora_to_weight's formulas (Forge
    backend/patcher/lora.py; reForge weight_adapter/*.py compute the same); None where there is no native kind."""
    strength, v, strength_model, offset, function = tuple(entry)[:5]
    patch = patch_value(v)
    if strength_model != 1.0 or function is not None or offset is not None or patch is None:
        return None
    kind, w = patch
    keep = holder.keep
    if kind == "diff":
        if tuple(w[0].shape) != tuple(layer.weight.shape):
            return None  # the host pads a channel-changing diff: its own formula
        return Dense(keep(w[0]), None, float(strength))
    if kind == "lora":
        up, down, alpha, mid, dora = w[:5]
        if len(w) > 5 and w[5] is not None:
            return None  # reForge's reshape_weight
        inner: Adapter = LowRank(keep(down), keep(up), None, keep(mid), _ratio(alpha, down.shape[0]))
    elif kind == "loha":
        w1a, w1b, alpha, w2a, w2b, t1, t2, dora = w[:8]
        inner = LoHa(keep(w1a), keep(w1b), keep(w2a), keep(w2b), _ratio(alpha, w1b.shape[0]), keep(t1), keep(t2))
    elif kind == "lokr":
        w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora = w[:9]
        # The host's alpha/dim uses the rank of the decomposed factor, w2's over w1's, and 1 when neither is.
        dim = w2b.shape[0] if w2 is None else w1b.shape[0] if w1 is None else None
        inner = LoKr(keep(w1), keep(w2), keep(w1a), keep(w1b), keep(w2a), keep(w2b), keep(t2),
                     1.0 if dim is None else _ratio(alpha, dim))
    else:
        return None
    if dora is None:
        inner.multiplier = inner.multiplier * float(strength) if isinstance(inner, LowRank) else float(strength)
        return inner
    weight = base()
    if _is_quantized(weight):
        raise Declined("a DoRA file on quantized weights needs a float weight")
    row, col = forge_dora(dora, weight, merged_weight(layer, inner))
    return Rescaled(inner, keep(row), keep(col), float(strength))


def _ratio(alpha: Any, rank: int) -> float:
    return 1.0 if alpha is None else float(alpha) / rank


def forge_dora(magnitude: Tensor, weight: Tensor, delta: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(row, col) of weight_decompose: W' = (W + ΔW)·m / (|·| + eps); a magnitude with one entry per output row is
    divided by the norms of W's rows, otherwise by the norms of (W + ΔW)'s input columns."""
    w = weight.float()
    m = magnitude.to(w.device).float()
    eps = torch.finfo(torch.float32).eps
    if m.shape[0] == w.shape[0]:
        return m.flatten() / (w.reshape(w.shape[0], -1).norm(dim=1) + eps), None
    merged = w + delta.to(w.device).float()
    return None, m.flatten() / (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1) + eps)


def module_adapter(kmodel: nn.Module, name: str, parts: dict[str, list], backend: Backend,
                   base_weight: Callable[[str], Tensor], holder: TensorHolder) -> Adapter:
    """One file's patches on one UNet module as an adapter applied from the file's factors.

    LoRA/LoCon, LoHa, LoKr, DoRA, full/diff and norm diffs have native kinds; anything else (GLoRA, OFT, "set",
    strength_model or a weight function) runs the host's own merge for that layer while it runs.
    """
    layer = kmodel.get_submodule(name)
    # Forge's (and its bnb/GGUF variants') Linear is a plain nn.Module named Linear (backend/operations.py).
    linear = isinstance(layer, nn.Linear) or type(layer).__name__ == "Linear"
    if not (linear or isinstance(layer, (nn.Conv2d, *_NORMS))):
        raise Declined(f"a LoRA patches {name} ({type(layer).__name__}); only Linear, Conv2d and norm layers can "
                       "be routed")
    entries = low_rank(parts["weight"]) if set(parts) == {"weight"} else None
    if entries is not None and (len(entries) > 1 or entries[0][1] is not None):
        kept = [(LowRank(holder.keep(lr.down), holder.keep(lr.up), lr.alpha, holder.keep(lr.mid), lr.multiplier),
                 offset) for lr, offset in entries]
        return Callback(partial(_sliced, layer if isinstance(layer, nn.Conv2d) else None, kept))
    kind = _native(layer, name, parts, base_weight, holder)
    if kind is None:
        kind = _materialized(name, parts, backend, base_weight)
    return Callback(partial(kind.apply, layer))


def _native(layer: nn.Module, name: str, parts: dict[str, list], base_weight: Callable[[str], Tensor],
            holder: TensorHolder) -> Adapter | None:
    """The file's entries on this layer's weight and bias as one native kind, or None."""
    weights, biases = parts.get("weight", []), parts.get("bias", [])
    if len(weights) > 1 or len(biases) > 1:
        return None  # several patches of one file on one key merge in sequence: the host's formula
    if isinstance(layer, _NORMS):
        diffs = [(float(e[0]), patch_value(e[1])) for e in (*weights, *biases) if tuple(e)[2:5] == (1.0, None, None)]
        if len(diffs) != len(weights) + len(biases) or any(p is None or p[0] != "diff" for _, p in diffs) or \
                len({s for s, _ in diffs}) != 1:
            return None
        dw = holder.keep(patch_value(weights[0][1])[1][0]) if weights else None
        db = holder.keep(patch_value(biases[0][1])[1][0]) if biases else None
        return NormDelta(dw, db, diffs[0][0])
    kinds = []
    if weights:
        kind = weight_kind(layer, weights[0], partial(base_weight, f"{name}.weight"), holder)
        if kind is None:
            return None
        kinds.append(kind)
    if biases:
        strength, v, strength_model, offset, function = tuple(biases[0])[:5]
        patch = patch_value(v)
        if patch is None or patch[0] != "diff" or (strength_model, offset, function) != (1.0, None, None):
            return None
        kinds.append(Bias(holder.keep(patch[1][0]), float(strength)))
    return kinds[0] if len(kinds) == 1 else Chain(tuple(kinds))


def _materialized(name: str, parts: dict[str, list], backend: Backend,
                  base_weight: Callable[[str], Tensor]) -> Materialized:
    """The host's merge of this layer's entries, redone each time the layer runs (nothing full-size is kept)."""
    for param in parts:
        if _is_quantized(base_weight(f"{name}.{param}")):
            raise Declined(f"{name}.{param} is stored quantized; this adapter type needs a float weight")

    def delta() -> tuple[Tensor, Tensor | None]:
        out = []
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            w = base_weight(key) if param in parts else None
            if w is None:
                out.append(None)
                continue
            with torch.no_grad():
                w = w.detach().float()
                out.append(backend.merge(parts[param], w.clone(), key).float() - w)
        weight = out[0] if out[0] is not None else torch.zeros_like(base_weight(f"{name}.weight"), dtype=torch.float32)
        return weight, out[1]

    return Materialized(delta)


def source_adapters(kmodel: nn.Module, source: LoraSource, backend: Backend, base_weight: Callable[[str], Tensor],
                    holder: TensorHolder) -> dict[nn.Module, Adapter]:
    """One LoRA file as {UNet module: adapter}; keys outside the diffusion model are not the UNet's."""
    by_module: dict[str, dict[str, list]] = {}
    for key, entries in source.patches.items():
        if isinstance(key, str) and key.startswith(PREFIX) and key.endswith((".weight", ".bias")):
            module, param = key.rsplit(".", 1)
            by_module.setdefault(module, {})[param] = entries
    return {kmodel.get_submodule(name): module_adapter(kmodel, name, parts, backend, base_weight, holder)
            for name, parts in by_module.items()}


def all_at_once(tables: list[dict[nn.Module, Adapter]]) -> dict[nn.Module, Adapter]:
    """Every LoRA's delta on every row: what the host's merge computes, for steps LoRAtorio leaves alone."""
    per_module: dict[nn.Module, list[Adapter]] = {}
    for table in tables:
        for module, adapter in table.items():
            per_module.setdefault(module, []).append(adapter)

    def run(adapters: list[Adapter], x: Tensor, y: Tensor) -> Tensor:
        for adapter in adapters:
            y = adapter.apply(None, x, y)
        return y

    return {module: Callback(partial(run, adapters)) for module, adapters in per_module.items()}


@dataclass
class LoraView:
    """The router as the Composer sees it: only the N LoRAs, not the extra 'all LoRAs' group."""

    router: MultiAdapter
    n_adapters: int

    def routed(self, labels: Any) -> Any:
        return self.router.routed(labels)

    @property
    def shared(self) -> tuple[int, ...]:
        return self.router.shared

    @shared.setter
    def shared(self, value: tuple[int, ...]) -> None:
        self.router.shared = value


@dataclass
class Chunk:
    """One cond or uncond chunk's predictions (G, B, C, H, W) with its x and sigma rows."""

    preds: Tensor
    x: Tensor
    sigma: Tensor


@dataclass
class StepRecord:
    """One step: what the conditioning modifier saw, and the chunks the model calls produced so far."""

    step: int
    active: bool
    n_cond: int
    edit_strength: float
    expects_uncond: bool
    conds: list[Chunk] = field(default_factory=list)
    uncond: Chunk | None = None
    fused_uncond: Tensor | None = None
    # (call, args) of each model call composed so far: what a failure later in the step re-runs plainly.
    calls: list[tuple[Callable, dict]] = field(default_factory=list)
    broken: bool = False  # a call of this step failed after others were composed
    fast: bool = False  # speed fast between full steps: one masked pass per call
    maps: list[Tensor] = field(default_factory=list)  # full step: each cond chunk's Ω, in arrival order
    fast_conds: int = 0  # fast step: cond chunks seen so far
    correct: bool = False  # speed fast's full step: base + LoRAs on the cond chunks; masked pass in finish_step
    fused_conds: list[Tensor] = field(default_factory=list)  # corrected full step: each cond chunk's fusion


@dataclass
class GenerationState:
    """One sampling pass: settings, routed UNet, LoRA sources, the cloned patcher's hooks, warnings and maps."""

    settings: Settings
    router: MultiAdapter
    composer: Composer
    networks: list[LoraSource]
    denoiser: Any
    all_label: int
    batched: bool
    record: StepRecord | None = None
    failed: str | None = None
    removed: bool = False
    chunk_maps: list[Tensor] = field(default_factory=list)  # the last full step's Ω per cond chunk (speed fast)
    map_sum: Tensor | None = None
    map_steps: int = 0
    warn: Callable[[str], None] = log.warning
    # Our UnetPatcher clone and what install() stripped from it, for the fallback's re-merge; and the host backend.
    unet: Any = None
    token: Any = None
    backend: Backend | None = None

    def begin_step(self, cond: list, uncond: Any, cond_scale: float, model_options: dict) -> None:
        """Conditioning modifier: a new step; cond's strengths are what the host's CFG multiplies by."""
        try:
            self._begin_step(cond, uncond, cond_scale, model_options)
        except Exception as exc:  # noqa: BLE001 - host boundary
            log.debug("LoRAtorio step start failed", exc_info=True)
            self.record = None
            self.fail(f"{type(exc).__name__}: {exc}")

    def _begin_step(self, cond: list, uncond: Any, cond_scale: float, model_options: dict) -> None:
        step, total = getattr(self.denoiser, "step", 0), getattr(self.denoiser, "total_steps", 0) or 0
        self.composer.total_steps = total
        active = self.failed is None and not self.removed and in_window(
            step, total, self.settings.start, self.settings.end)
        strength = sum(c.get("strength", 1) for c in cond)
        # The host drops the uncond at CFG scale 1 (also skip-early-CFG and NGMS) unless a hook disabled that.
        skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        # A fast step needs every cond chunk's map from the last full step (chunks come in the same order each step).
        fast = active and len(self.chunk_maps) == len(cond) and self.composer.fast_step(
            step, self.chunk_maps[0].shape[1] if self.chunk_maps else 0)
        self.record = StepRecord(step, active, len(cond), strength, uncond is not None and not skip, fast=fast,
                                 correct=active and not fast and self.composer.corrects)

    def model_call(self, apply_model: Callable, args: dict, prev: Callable | None) -> Tensor:
        """model_function_wrapper: base + LoRAs on this call's chunks; cond chunks fused, uncond kept for CFG."""
        call = partial(_call_through, apply_model, prev)
        if self.removed or self.failed is not None:
            return call(args)  # after a failure the host has its LoRAs merged again and none of our hooks run
        rec = self.record
        try:
            if rec is None or not rec.active:
                # Steps outside the window run every LoRA on every row through our hooks: they can fail too.
                return self.merged(call, args)
            # The UNet consumes the ControlNet residual lists in c["control"] (apply_control pops them): the failure
            # replay needs its own lists.
            fresh = {**args, "c": _fresh_control(args["c"])}
            out = self.compose_call(call, args, rec)
        except Exception as exc:  # noqa: BLE001 - host boundary: any failure means plain sampling, not a crash
            log.debug("LoRAtorio step failed", exc_info=True)
            if rec is not None:
                rec.broken = bool(rec.calls)
            self.fail(f"{type(exc).__name__}: {exc}")
            return call(args)
        rec.calls.append((call, fresh))
        return out

    def merged(self, call: Callable[[dict], Tensor], args: dict) -> Tensor:
        """Every LoRA on every row (steps outside the composition window): what the host's merge computes."""
        # The 'all LoRAs' group already holds the global ones: they must not be added a second time.
        shared, self.router.shared = self.router.shared, ()
        try:
            with self.router.routed([self.all_label] * args["input"].shape[0]):
                return call(args)
        finally:
            self.router.shared = shared

    def compose_call(self, call: Callable[[dict], Tensor], args: dict, rec: StepRecord) -> Tensor:
        x, sigma, c = args["input"], args["timestep"], args["c"]
        kinds = list(args["cond_or_uncond"])
        b = x.shape[0] // len(kinds)
        if rec.fast:
            return self.fast_call(call, args, rec, kinds, b)
        tensors = {k: v for k, v in c.items() if k not in ("transformer_options", "control_model")}
        if rec.correct:
            return self.cond_chunks_call(call, args, rec, kinds, b, tensors)
        # Which row of this host call each row is, so that a chunk's per-chunk options follow its rows; a host
        # chunk's b rows stay in one call (the unit), as cond_or_uncond describes whole chunks.
        row_ids = torch.arange(x.shape[0])
        preds = self.composer.predict(partial(_expanded_call, call, args, b), (x, sigma, tensors, row_ids), rec.step,
                                      unit=b)
        out = preds[0].clone()
        for i, kind in enumerate(kinds):
            rows = slice(i * b, (i + 1) * b)
            chunk = Chunk(preds[:, rows], x[rows], sigma[rows])
            if kind == 0:
                out[rows] = self.fuse_cond(chunk, rec)
                rec.conds.append(chunk)
                if self.settings.speed == "fast" and self.composer.last_weights is not None:
                    rec.maps.append(self.composer.last_weights)
            else:
                rec.uncond = chunk
        uncond_at = [i for i, kind in enumerate(kinds) if kind != 0]
        if uncond_at and len(rec.conds) >= rec.n_cond:
            rows = slice(uncond_at[0] * b, (uncond_at[0] + 1) * b)
            out[rows] = self.uncond_of(rec)
        return out

    def cond_chunks_call(self, call: Callable[[dict], Tensor], args: dict, rec: StepRecord, kinds: list, b: int,
                         tensors: dict) -> Tensor:
        """A corrected full step (speed fast): base + LoRAs on this call's cond chunks only, fused at once; the
        uncond rows it returns are placeholders, replaced in finish_step by the masked pass's."""
        x, sigma = args["input"], args["timestep"]
        out = torch.zeros_like(x)
        cond_at = [i for i, kind in enumerate(kinds) if kind == 0]
        if not cond_at:
            return out
        idx = torch.cat([torch.arange(i * b, (i + 1) * b) for i in cond_at])
        sub = tree_map(lambda t: t.index_select(0, idx.to(t.device)) if t.dim() and t.shape[0] == x.shape[0]
                       else t, tensors)
        preds = self.composer.predict(partial(_expanded_call, call, args, b), (x[idx], sigma[idx], sub, idx),
                                      rec.step, unit=b)
        for j, i in enumerate(cond_at):
            rows = slice(i * b, (i + 1) * b)
            chunk = Chunk(preds[:, j * b:(j + 1) * b], x[rows], sigma[rows])
            out[rows] = self.fuse_cond(chunk, rec)
            rec.conds.append(chunk)
            rec.fused_conds.append(out[rows].clone())  # the host may reuse the returned tensor
            rec.maps.append(self.composer.last_weights)
        return out

    def chunk_masks(self, kinds: list, b: int, first: int) -> tuple[Tensor, list[int]]:
        """The masks of one call's chunks, and the arrival ordinal of each cond chunk in the step (from `first`): a
        cond chunk takes the map of the cond chunk that came at its place on the full step; the negative, the first
        sub-prompt's (the last to run) scaled by 1 − λ, as `uncond_of` fuses it."""
        masks, ordinals = [], []
        for kind in kinds:
            if kind == 0:
                ordinals.append(first + len(ordinals))
                w = self.chunk_maps[ordinals[-1]]
                masks.append(self.composer.row_masks(BatchLayout(tuple(range(b))), b, w))
            else:
                w = self.chunk_maps[-1]
                masks.append(self.composer.row_masks(BatchLayout.cond_then_uncond(b), 2 * b, w)[:, b:])
        return torch.cat(masks, dim=1), ordinals

    def fast_call(self, call: Callable[[dict], Tensor], args: dict, rec: StepRecord, kinds: list, b: int) -> Tensor:
        """Speed fast: the call's chunks in one pass, each LoRA masked by its map from the last full step; each
        cond chunk plus the residual that full step kept for it (FastRules.correct)."""
        masks, ordinals = self.chunk_masks(kinds, b, rec.fast_conds)
        rec.fast_conds += len(ordinals)
        with self.router.masked(self.composer.masks(masks)):
            out = call(args)
        x, sigma = args["input"], args["timestep"]
        for i in [i for i, kind in enumerate(kinds) if kind == 0]:
            rows = slice(i * b, (i + 1) * b)
            out[rows] = self.composer.corrected(out[rows], ordinals.pop(0), x[rows], sigma[rows])
        return out

    def masked_pass(self, rec: StepRecord, args: dict) -> dict:
        """A corrected full step's end: every recorded call again as one masked pass with this step's maps; each
        cond chunk's residual ε_fused − ε_masked is kept, and the masked negative goes to the CFG."""
        if len(self.chunk_maps) != rec.n_cond or len(rec.fused_conds) != rec.n_cond:
            raise Declined("the step's cond chunks did not all come through LoRAtorio")
        seen, unconds = 0, []
        for call, call_args in rec.calls:
            kinds = list(call_args["cond_or_uncond"])
            b = call_args["input"].shape[0] // len(kinds)
            masks, ordinals = self.chunk_masks(kinds, b, seen)
            seen += len(ordinals)
            with self.router.masked(self.composer.masks(masks)):
                out = call({**call_args, "c": _fresh_control(call_args["c"])})
            x, sigma = call_args["input"], call_args["timestep"]
            for i, kind in enumerate(kinds):
                rows = slice(i * b, (i + 1) * b)
                if kind == 0:
                    j = ordinals.pop(0)
                    self.composer.keep_residual(rec.fused_conds[j], out[rows], j, x[rows], sigma[rows])
                else:
                    unconds.append(out[rows])
        if unconds:
            args = {**args, "uncond_denoised": unconds[0], "uncond": args["input"] - unconds[0]}
        return args

    def fuse_cond(self, chunk: Chunk, rec: StepRecord) -> Tensor:
        """One cond chunk fused against its reference (its base rows, or the step's base uncond rows)."""
        b = chunk.x.shape[0]
        if self.settings.reference == "uncond" and self.settings.mode == "loratorio":
            if rec.uncond is not None:
                both = _pair(chunk, rec.uncond)
                return self.composer.fuse(both.preds, BatchLayout.cond_then_uncond(b), rec.step, both.x,
                                          both.sigma)[:b]
            if rec.expects_uncond:
                raise Declined("the host evaluated the prompt before the negative prompt; reference 'uncond' "
                               "needs it first (use reference 'cond')")
        return self.composer.fuse(chunk.preds, BatchLayout(tuple(range(b))), rec.step, chunk.x, chunk.sigma)

    def uncond_of(self, rec: StepRecord) -> Tensor:
        """The re-centred uncond, fused with the weights of the first sub-prompt (the last cond chunk to run)."""
        if rec.fused_uncond is None:
            both = _pair(rec.conds[-1], rec.uncond)
            b = both.x.shape[0] // 2
            rec.fused_uncond = self.composer.fuse(both.preds, BatchLayout.cond_then_uncond(b), rec.step, both.x,
                                                  both.sigma)[b:]
        return rec.fused_uncond

    def finish_step(self, args: dict, prev: Callable | None) -> Tensor:
        """sampler_cfg_function: the host's CFG (or the previous cfg function) on the fused predictions."""
        rec, self.record = self.record, None
        if rec is not None and rec.active and self.failed is None and not self.removed and rec.fast:
            self.accumulate_maps()  # the host's predictions already are the masked pass's
        elif rec is not None and rec.active and self.failed is None and not self.removed and rec.conds:
            if len(rec.maps) == rec.n_cond:
                self.chunk_maps = rec.maps
            try:
                if rec.correct:
                    args = self.masked_pass(rec, args)
                elif rec.uncond is not None:
                    fused = self.uncond_of(rec)
                    args = {**args, "uncond_denoised": fused, "uncond": args["input"] - fused}
                self.accumulate_maps()
            except Exception as exc:  # noqa: BLE001 - host boundary
                log.debug("LoRAtorio fusion failed", exc_info=True)
                self.fail(f"{type(exc).__name__}: {exc}")
                rec.broken = True
        if rec is not None and rec.broken:
            args = self.replay(rec, args)
        if prev is not None:
            return prev(args)
        return args["input"] - default_cfg(args, 1.0 if rec is None else rec.edit_strength)

    def replay(self, rec: StepRecord, args: dict) -> dict:
        """After a failure mid-step, the chunks our calls produced re-run by the host's plain call (its LoRAs merged
        again), so the step's CFG sees the host's own predictions: the uncond, and the cond of a single prompt."""
        try:
            conds, unconds = [], []
            for call, call_args in rec.calls:
                kinds = list(call_args["cond_or_uncond"])
                for kind, chunk in zip(kinds, call(call_args).chunk(len(kinds)), strict=True):
                    (conds if kind == 0 else unconds).append(chunk)
            if len(unconds) == 1:
                args = {**args, "uncond_denoised": unconds[0], "uncond": args["input"] - unconds[0]}
            if len(conds) == 1 and rec.n_cond == 1:
                args = {**args, "cond_denoised": conds[0], "cond": args["input"] - conds[0]}
        except Exception:  # noqa: BLE001 - host boundary: keep the host's own values for this one step
            log.warning("LoRAtorio: could not re-run the failed step's earlier chunks", exc_info=True)
        return args

    def accumulate_maps(self) -> None:
        """Running mean of each image's weight map (first sub-prompt), for the 'show maps' images."""
        w = self.composer.display_weights
        if not self.settings.show_maps or w is None or w.dim() != 5 or w.shape[-1] == 1:
            return
        self.map_sum, self.map_steps = accumulate(self.map_sum, self.map_steps, w[:, :, 0].float().cpu())

    def fail(self, reason: str) -> None:
        """Stop composing for the rest of this pass and hand it back to the host, and say so once.

        The fallback uses nothing that may have failed: our hooks are removed and the host re-merges its own LoRA
        patches into our clone's weights, so the rest samples exactly as without LoRAtorio.
        """
        if self.failed is not None:
            return
        self.failed = reason
        self.router.remove()
        try:
            if self.unet is not None:
                self.backend.remerge(self.unet, self.token)
        except Exception as exc:  # noqa: BLE001 - host boundary
            log.warning("LoRAtorio: the host could not re-merge its LoRAs", exc_info=True)
            self.warn(f"LoRAtorio stopped: {reason}; the host could not merge its LoRAs again ({exc}), so the rest "
                      "was sampled without them")
            return
        self.warn(f"LoRAtorio stopped: {reason}; the rest was sampled normally")


def _pair(cond: Chunk, uncond: Chunk) -> Chunk:
    return Chunk(torch.cat([cond.preds, uncond.preds], dim=1), torch.cat([cond.x, uncond.x]),
                 torch.cat([cond.sigma, uncond.sigma]))


def default_cfg(args: dict, edit_strength: float) -> Tensor:
    """The host's CFG when no cfg function is set (sampling_function.py / samplers.py cfg_function)."""
    cond, uncond, scale = args["cond_denoised"], args["uncond_denoised"], args["cond_scale"]
    if not math.isclose(edit_strength, 1.0):
        return uncond + (cond - uncond) * scale * edit_strength
    return uncond + (cond - uncond) * scale


def _call_through(apply_model: Callable, prev: Callable | None, args: dict) -> Tensor:
    """The host's call: a previous model_function_wrapper if one was set, else apply_model itself."""
    if prev is not None:
        return prev(apply_model, args)
    return apply_model(args["input"], args["timestep"], **args["c"])


def _expanded_call(call: Callable[[dict], Tensor], args: dict, b: int, inputs: tuple) -> Tensor:
    """Call with `inputs`: whole host chunks of b rows, `rows` naming each row's row in the host's call.

    The per-chunk transformer options (cond_or_uncond, uuids) and per-row ones (cond_mark, cond/uncond indices) are
    rebuilt for these rows, so that patches reading them see a consistent call of their own.
    """
    x, sigma, tensors, rows = inputs
    host_rows, host_kinds = args["input"].shape[0], list(args["cond_or_uncond"])
    chunks = (rows[::b] // b).tolist()  # the host chunk each b rows come from
    kinds = [host_kinds[i] for i in chunks]
    # Fresh containers per call: the UNet pops ControlNet's residual lists, and sequential evaluation calls it once
    # per model with the same inputs (a real Forge gave the later models no hint, or a wrong one).
    c = _fresh_control({**args["c"], **tensors})
    same = x.shape[0] == host_rows and chunks == list(range(len(host_kinds)))
    if not same and "transformer_options" in c:
        to = dict(c["transformer_options"])
        to["cond_or_uncond"] = kinds
        mark = to.get("cond_mark")
        if isinstance(mark, Tensor) and mark.dim() == 1 and mark.shape[0] == host_rows:
            to["cond_mark"] = mark[rows.to(mark.device)]
        if "cond_indices" in to:
            to["cond_indices"] = [r for i, k in enumerate(kinds) if k == 0 for r in range(i * b, (i + 1) * b)]
            to["uncond_indices"] = [r for i, k in enumerate(kinds) if k != 0 for r in range(i * b, (i + 1) * b)]
        uuids = to.get("uuids")
        if isinstance(uuids, list) and len(uuids) == len(host_kinds):
            to["uuids"] = [uuids[i] for i in chunks]
        c["transformer_options"] = to
    return call({"input": x, "timestep": sigma, "c": c, "cond_or_uncond": kinds})


def _fresh_control(c: dict) -> dict:
    """c with new lists of ControlNet residuals in c["control"] (the same tensors), which the UNet may pop."""
    control = c.get("control")
    if not isinstance(control, dict):
        return c
    return {**c, "control": {k: list(v) if isinstance(v, list) else v for k, v in control.items()}}


def base_weight_fn(unet: Any, kind: str) -> Callable[[str], Tensor]:
    """A parameter's unmerged value: the shared loader's backup if the model is merged now, else the parameter."""
    kmodel = unet.model

    def get(key: str) -> Tensor | None:
        if kind == "forge":
            backup = getattr(getattr(kmodel, "lora_loader", None), "backup", {}).get(key)
        else:
            backup = getattr(unet.backup.get(key), "weight", None)
        if backup is not None:
            return backup
        module, param = key.rsplit(".", 1)
        return getattr(kmodel.get_submodule(module), param, None)

    return get


def install(p: Any, settings: Settings, *, backend: Backend, networks_module: Any,
            warn: Callable[[str], None]) -> GenerationState | None:
    """Clone, strip and patch `p.sd_model.forge_objects.unet`, or return None (with a warning) to sample normally."""
    sd_model = p.sd_model
    unet = sd_model.forge_objects.unet.clone()
    token = unet.model_options.get(KEY)
    if token is not None:
        token.restore(unet)
    if backend.kind == "forge":
        sources = forge_sources(unet.lora_patches, networks_module)
    else:
        sources = reforge_sources(getattr(sd_model, "current_lora_hash", ""), backend, networks_module)
    globals_, sources, missing = settings.split_globals(sources, lambda s: (s.name, s.mentioned_name,
                                                                            _stem(s.filename)))
    if missing:
        warn(f"LoRAtorio: global LoRA(s) {', '.join(missing)} not among the prompt's LoRAs; ignored")
    if len(sources) < 2:
        also = f" besides {len(globals_)} global" if globals_ else ""
        warn(f"LoRAtorio needs 2 or more LoRAs in the prompt with a UNet weight{also}; found {len(sources)}, "
             "sampled normally")
        return None
    holder = TensorHolder()
    base = base_weight_fn(unet, backend.kind)
    names = [s.name for s in sources]
    try:
        tables = [source_adapters(unet.model, s, backend, base, holder) for s in sources]
        empty = [n for n, t in zip(names, tables, strict=True) if not t]
        if empty:
            raise Declined(f"{', '.join(empty)} change no UNet layer of this model")
        # Before anything of the host changes: a file read wrongly fails here, and sampling is simply the host's.
        dry_run(unet.model.diffusion_model, tables, names)
    except Exception as exc:  # noqa: BLE001 - host boundary: an unreadable file means "sample normally", said why
        log.debug("LoRAtorio could not read the LoRAs", exc_info=True)
        warn(f"LoRAtorio: {exc}; sampled normally")
        return None
    return _patch(p, unet, settings, sources, inject_fault(tables, names), holder, backend, warn, globals_)


def _patch(p: Any, unet: Any, settings: Settings, sources: list[LoraSource], tables: list, holder: TensorHolder,
           backend: Backend, warn: Callable[[str], None], globals_: Sequence[LoraSource] = ()) -> GenerationState:
    options = unet.model_options
    prev_wrapper, prev_cfg = options.get("model_function_wrapper"), options.get("sampler_cfg_function")
    batched = settings.evaluation == "batched" or (settings.evaluation == "auto" and prev_wrapper is None)
    router = MultiAdapter(unet.model.diffusion_model, [*tables, all_at_once(tables)])
    composer = Composer(LoraView(router, len(tables)), settings, batched=batched, budget=memory_budget(unet, backend))
    state = GenerationState(settings, router, composer, sources, p.sampler.model_wrap_cfg, len(tables), batched,
                            warn=warn, unet=unet, backend=backend)

    # Plain closures: model_options is deep-copied by every later clone(), and functions copy as themselves.
    def modifier(model, x, sigma, uncond, cond, cond_scale, model_options, seed):
        state.begin_step(cond, uncond, cond_scale, model_options)
        return model, x, sigma, uncond, cond, cond_scale, model_options, seed

    def wrapper(apply_model, args):
        return state.model_call(apply_model, args, prev_wrapper)

    def cfg(args):
        return state.finish_step(args, prev_cfg)

    patcher = unet.add_extra_torch_module_during_sampling(holder, cast_to_unet_dtype=False)
    options[KEY] = state.token = _Token(unet, modifier, patcher)
    strip(unet, backend.kind, globals_)
    unet.add_conditioning_modifier(modifier)
    unet.set_model_unet_function_wrapper(wrapper)
    unet.set_model_sampler_cfg_function(cfg)
    # The memory the host reserves for sampling stays its estimate for plain rows: the batched call is split to fit
    # what is free, and a larger reservation would make the host offload weights, which costs more than a chunk.
    router.install()
    p.sd_model.forge_objects.unet = unet
    log.info("LoRAtorio (%s): %d LoRAs composed, %d global, mode %s, %s evaluation", backend.kind, len(sources),
             len(globals_), settings.mode, "batched" if batched else "sequential")
    return state


def memory_budget(unet: Any, backend: Backend) -> MemoryBudget:
    """The host's memory manager: free bytes on the UNet's device, and the model's own estimate of a call's peak.

    On the CPU (`--always-cpu`) there is no device budget: the manager would report the system's free RAM, which the
    model, the OS and other programs share; only the out-of-memory retry applies there.
    """
    device = getattr(unet, "load_device", None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    release = backend.empty_cache or (lambda: None)
    if device.type == "cpu" or backend.free_memory is None:
        return MemoryBudget(lambda: None, lambda rows, shape: 0.0, release)
    return MemoryBudget(lambda: backend.free_memory(device),
                        lambda rows, shape: unet.model.memory_required([rows, *shape]), release)


def refuse(p: Any, message: str) -> Callable[[], None]:
    """Make this pass fail with `message` from its first model call; returns the undo.

    The host swallows exceptions from script hooks, and its CFG denoiser never calls the inner model (it reads the
    UnetPatcher off it), so the refusal rides on a clone's model_function_wrapper instead (A1111: a1111.refuse).
    """
    objects = p.sd_model.forge_objects
    original = objects.unet
    unet = original.clone()

    def wrapper(apply_model, args):
        raise SettingsError(message)

    unet.set_model_unet_function_wrapper(wrapper)
    objects.unet = unet

    def undo() -> None:
        if objects.unet is unet:
            objects.unet = original
    return undo


def remove(state: GenerationState | None) -> None:
    """Undo `install`'s module hooks; the patcher clone then passes calls through. Safe to call twice."""
    if state is None:
        return
    state.router.remove()
    state.removed = True
    state.record = None
