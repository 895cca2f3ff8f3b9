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
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from loratorio.core import Adapter, BatchLayout, Callback, Composer, Dense, LowRank, MultiAdapter, Settings, in_window
from loratorio.maps import accumulate

log = logging.getLogger(__name__)

KEY = "loratorio"
PREFIX = "diffusion_model."
_MISSING = object()
# model_options entries we set; restored when our own clone is cloned again (Forge's first hires call).
_OPTIONS = ("model_function_wrapper", "sampler_cfg_function", "memory_peak_estimation_modifier")


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


def forge_backend() -> Backend:
    """Forge 2.x: merge_lora_to_weight from backend/patcher/lora.py; per-file patches are on the patcher."""
    from backend.patcher.lora import merge_lora_to_weight

    return Backend("forge", lambda entries, w, key: merge_lora_to_weight(entries, w, key, torch.float32))


def reforge_backend(sd_model: Any, networks_module: Any) -> Backend:
    """reForge: patches are merged per key, so each file is reloaded through the host's own loader (lru-cached)."""
    from ldm_patched.modules.lora import calculate_weight
    from ldm_patched.modules.sd import load_lora_for_models

    def load_file(filename: str, multiplier: float) -> dict:
        state_dict = networks_module.load_lora_state_dict(filename)
        patcher, _ = load_lora_for_models(sd_model.forge_objects_original.unet, None, state_dict, multiplier, 0,
                                          filename=filename)
        return patcher.patches

    return Backend("reforge", lambda entries, w, key: calculate_weight(entries, w, key), load_file)


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
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "lora":
            weights = v[1]
        elif getattr(v, "name", None) == "lora" and hasattr(v, "weights"):  # reForge's weight_adapter.LoRAAdapter
            weights = v.weights
        else:
            return None
        up, down, alpha, mid, dora = weights[:5]
        if dora is not None or (len(weights) > 5 and weights[5] is not None):
            return None
        alpha = None if alpha is None else float(alpha)
        parts.append((LowRank(down, up, alpha, mid, float(strength)), None if offset is None else tuple(offset)))
    return parts or None


def _sliced(layer: nn.Module | None, parts: list[tuple[LowRank, tuple | None]], x: Tensor, y: Tensor) -> Tensor:
    """Several low-rank entries on one layer, each added to its slice of the output (channels for a conv)."""
    dim = 1 if isinstance(layer, nn.Conv2d) else -1
    for adapter, offset in parts:
        # narrow() is a view: the in-place add lands in y.
        adapter.apply(layer, x, y if offset is None else y.narrow(dim, offset[1], offset[2]))
    return y


class TensorHolder(nn.Module):
    """The LoRA tensors as one module, so the host's memory manager can count and move them."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = nn.ParameterList()
        self._seen: dict[int, nn.Parameter] = {}

    def keep(self, t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if id(t) not in self._seen:
            param = nn.Parameter(t.detach(), requires_grad=False)
            self.tensors.append(param)
            self._seen[id(t)] = param
        return self._seen[id(t)]


def _is_quantized(w: Tensor) -> bool:
    return hasattr(w, "bnb_quantized") or getattr(w, "gguf_cls", None) is not None


def module_adapter(kmodel: nn.Module, name: str, parts: dict[str, list], backend: Backend,
                   base_weight: Callable[[str], Tensor], holder: TensorHolder) -> Adapter:
    """One file's patches on one UNet module: LowRank when plain, else a Dense ΔW computed once now."""
    layer = kmodel.get_submodule(name)
    # Forge's (and its bnb/GGUF variants') Linear is a plain nn.Module named Linear (backend/operations.py).
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) and type(layer).__name__ != "Linear":
        raise Declined(f"a LoRA patches {name} ({type(layer).__name__}); only Linear and Conv2d layers can be routed")
    entries = low_rank(parts["weight"]) if set(parts) == {"weight"} else None
    if entries is not None:
        kept = [(LowRank(holder.keep(lr.down), holder.keep(lr.up), lr.alpha, holder.keep(lr.mid), lr.multiplier),
                 offset) for lr, offset in entries]
        if len(kept) == 1 and kept[0][1] is None:
            return _bound(kept[0][0], layer)
        return Callback(partial(_sliced, layer if isinstance(layer, nn.Conv2d) else None, kept))
    deltas = {}
    for param in ("weight", "bias"):
        key = f"{name}.{param}"
        w = base_weight(key) if param in parts else None
        if w is None:
            continue
        if _is_quantized(w):
            raise Declined(f"{key} is stored quantized; non-LoRA adapter types need a float weight")
        with torch.no_grad():
            w = w.detach().float()
            deltas[param] = backend.merge(parts[param], w.clone(), key).float() - w
    weight = deltas.get("weight")
    if weight is None:
        weight = torch.zeros_like(base_weight(f"{name}.weight"), dtype=torch.float32)
    return _bound(Dense(holder.keep(weight), holder.keep(deltas.get("bias"))), layer)


def _bound(adapter: LowRank | Dense, layer: nn.Module) -> Callback:
    """Forge's Linear is a plain nn.Module (backend/operations.py), so adapters reach layers through a Callback."""
    if isinstance(layer, nn.Conv2d):
        return Callback(partial(adapter.apply, layer))
    shape_of = SimpleNamespace(weight=adapter.delta_weight) if isinstance(adapter, Dense) else None
    return Callback(partial(adapter.apply, shape_of))


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
    map_sum: Tensor | None = None
    map_steps: int = 0
    warn: Callable[[str], None] = log.warning

    def begin_step(self, cond: list, uncond: Any, cond_scale: float, model_options: dict) -> None:
        """Conditioning modifier: a new step; cond's strengths are what the host's CFG multiplies by."""
        step, total = getattr(self.denoiser, "step", 0), getattr(self.denoiser, "total_steps", 0) or 0
        self.composer.total_steps = total
        active = self.failed is None and not self.removed and in_window(
            step, total, self.settings.start, self.settings.end)
        strength = sum(c.get("strength", 1) for c in cond)
        # The host drops the uncond at CFG scale 1 (also skip-early-CFG and NGMS) unless a hook disabled that.
        skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        self.record = StepRecord(step, active, len(cond), strength, uncond is not None and not skip)

    def model_call(self, apply_model: Callable, args: dict, prev: Callable | None) -> Tensor:
        """model_function_wrapper: base + LoRAs on this call's chunks; cond chunks fused, uncond kept for CFG."""
        call = partial(_call_through, apply_model, prev)
        if self.removed:
            return call(args)
        rec = self.record
        if rec is None or not rec.active or self.failed is not None:
            return self.merged(call, args)
        try:
            return self.compose_call(call, args, rec)
        except Exception as exc:  # noqa: BLE001 - host boundary: any failure means plain sampling, not a crash
            log.debug("LoRAtorio step failed", exc_info=True)
            self.fail(f"{type(exc).__name__}: {exc}")
            return self.merged(call, args)

    def merged(self, call: Callable[[dict], Tensor], args: dict) -> Tensor:
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
        tensors = {k: v for k, v in c.items() if k not in ("transformer_options", "control_model")}
        preds = self.composer.predict(partial(_expanded_call, call, args, b), (x, sigma, tensors), rec.step)
        out = preds[0].clone()
        for i, kind in enumerate(kinds):
            rows = slice(i * b, (i + 1) * b)
            chunk = Chunk(preds[:, rows], x[rows], sigma[rows])
            if kind == 0:
                out[rows] = self.fuse_cond(chunk, rec)
                rec.conds.append(chunk)
            else:
                rec.uncond = chunk
        uncond_at = [i for i, kind in enumerate(kinds) if kind != 0]
        if uncond_at and len(rec.conds) >= rec.n_cond:
            rows = slice(uncond_at[0] * b, (uncond_at[0] + 1) * b)
            out[rows] = self.uncond_of(rec)
        return out

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
        if rec is not None and rec.active and self.failed is None and not self.removed and rec.conds:
            try:
                if rec.uncond is not None:
                    fused = self.uncond_of(rec)
                    args = {**args, "uncond_denoised": fused, "uncond": args["input"] - fused}
                self.accumulate_maps()
            except Exception as exc:  # noqa: BLE001 - host boundary
                log.debug("LoRAtorio fusion failed", exc_info=True)
                self.fail(f"{type(exc).__name__}: {exc}")
        if prev is not None:
            return prev(args)
        return args["input"] - default_cfg(args, 1.0 if rec is None else rec.edit_strength)

    def accumulate_maps(self) -> None:
        """Running mean of each image's weight map (first sub-prompt), for the 'show maps' images."""
        w = self.composer.display_weights
        if not self.settings.show_maps or w is None or w.dim() != 5 or w.shape[-1] == 1:
            return
        self.map_sum, self.map_steps = accumulate(self.map_sum, self.map_steps, w[:, :, 0].float().cpu())

    def fail(self, reason: str) -> None:
        """Stop composing for the rest of this pass (every LoRA merged-equivalent), and say so once."""
        if self.failed is None:
            self.failed = reason
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
    """Call with `inputs` (G copies of the host's chunks); per-row transformer options repeated to match."""
    x, sigma, tensors = inputs
    copies = x.shape[0] // args["input"].shape[0]
    c = {**args["c"], **tensors}
    kinds = list(args["cond_or_uncond"]) * copies
    if copies > 1 and "transformer_options" in c:
        to = dict(c["transformer_options"])
        to["cond_or_uncond"] = kinds
        if isinstance(to.get("cond_mark"), Tensor):
            to["cond_mark"] = to["cond_mark"].repeat(copies)
        if "cond_indices" in to:
            to["cond_indices"] = [r for i, k in enumerate(kinds) if k == 0 for r in range(i * b, (i + 1) * b)]
            to["uncond_indices"] = [r for i, k in enumerate(kinds) if k != 0 for r in range(i * b, (i + 1) * b)]
        if isinstance(to.get("uuids"), list):
            to["uuids"] = to["uuids"] * copies
        c["transformer_options"] = to
    return call({"input": x, "timestep": sigma, "c": c, "cond_or_uncond": kinds})


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
    try:
        tables = [source_adapters(unet.model, s, backend, base, holder) for s in sources]
    except Declined as exc:
        warn(f"LoRAtorio: {exc}; sampled normally")
        return None
    empty = [s.name for s, t in zip(sources, tables, strict=True) if not t]
    if empty:
        warn(f"LoRAtorio: {', '.join(empty)} change no UNet layer of this model; sampled normally")
        return None
    return _patch(p, unet, settings, sources, tables, holder, backend, warn, globals_)


def _patch(p: Any, unet: Any, settings: Settings, sources: list[LoraSource], tables: list, holder: TensorHolder,
           backend: Backend, warn: Callable[[str], None], globals_: Sequence[LoraSource] = ()) -> GenerationState:
    options = unet.model_options
    prev_wrapper, prev_cfg = options.get("model_function_wrapper"), options.get("sampler_cfg_function")
    batched = settings.evaluation == "batched" or (settings.evaluation == "auto" and prev_wrapper is None)
    router = MultiAdapter(unet.model.diffusion_model, [*tables, all_at_once(tables)])
    composer = Composer(LoraView(router, len(tables)), settings, batched=batched)
    state = GenerationState(settings, router, composer, sources, p.sampler.model_wrap_cfg, len(tables), batched,
                            warn=warn)

    # Plain closures: model_options is deep-copied by every later clone(), and functions copy as themselves.
    def modifier(model, x, sigma, uncond, cond, cond_scale, model_options, seed):
        state.begin_step(cond, uncond, cond_scale, model_options)
        return model, x, sigma, uncond, cond, cond_scale, model_options, seed

    def wrapper(apply_model, args):
        return state.model_call(apply_model, args, prev_wrapper)

    def cfg(args):
        return state.finish_step(args, prev_cfg)

    patcher = unet.add_extra_torch_module_during_sampling(holder, cast_to_unet_dtype=False)
    options[KEY] = _Token(unet, modifier, patcher)
    strip(unet, backend.kind, globals_)
    unet.add_conditioning_modifier(modifier)
    unet.set_model_unet_function_wrapper(wrapper)
    unet.set_model_sampler_cfg_function(cfg)
    if batched:
        groups = len(composer.groups(0))
        estimate = options.get("memory_peak_estimation_modifier", unet.memory_required)
        unet.set_memory_peak_estimation_modifier(lambda shape: estimate([shape[0] * groups, *shape[1:]]))
    router.install()
    p.sd_model.forge_objects.unet = unet
    log.info("LoRAtorio (%s): %d LoRAs composed, %d global, mode %s, %s evaluation", backend.kind, len(sources),
             len(globals_), settings.mode, "batched" if batched else "sequential")
    return state


def refuse(p: Any, message: str) -> Callable[[], None]:
    """Make this pass fail with `message` from its first model call; returns the undo.

    The host swallows exceptions from script hooks, and its CFG denoiser never calls the inner model (it reads the
    UnetPatcher off it), so the refusal rides on a clone's model_function_wrapper instead (A1111: a1111.refuse).
    """
    objects = p.sd_model.forge_objects
    original = objects.unet
    unet = original.clone()

    def wrapper(apply_model, args):
        raise ValueError(message)

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
