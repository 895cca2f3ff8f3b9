"""Small fakes of the Forge 2.x / reForge objects LoRAtorio touches, written from the hosts' real signatures.

- Forge `backend/patcher/base.py` ModelPatcher + `unet.py` UnetPatcher: `clone()` (lora_patches shallow copy,
  model_options deep copy), `add_patches` keyed `(filename, strength_patch, strength_model, online)`, the setters,
  `add_extra_torch_module_during_sampling`, and a `LoraLoader` shared by all clones that merges on load.
- reForge `ModelPatcher`: `patches` merged per key, `patches_uuid`, `backup` shared by clones.
- `backend/sampling/sampling_function.py`: conditioning modifiers, the CFG-1 optimisation, `calc_cond_uncond_batch`
  (chunks reversed, uncond first; `max_chunks` stands in for free memory), model_function_wrapper, cfg function.
- Forge's Linear is a plain nn.Module (backend/operations.py), reproduced as `ForgeLinear`.
"""

from __future__ import annotations

import copy
import inspect
import math
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from tests.toy import TinyUNet, make_unet


class ForgeOperations:
    class Linear(nn.Module):
        """backend/operations.py ForgeOperations.Linear: not an nn.Linear subclass."""

        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                      requires_grad=False)

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)


ForgeLinear = ForgeOperations.Linear


class DiffusionModel(TinyUNet):
    """The UNet as KModel calls it: forward(x, t, context=, control=, transformer_options=, **kw)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def forward(self, x, t, context=None, control=None, transformer_options=None, y=None, **kwargs):
        """y: SDXL's pooled vector (pooled text, size and crop embeddings); it shifts the context here, as the real
        UNet adds it to the time embedding through label_emb."""
        self.seen.append({"rows": x.shape[0], "to": transformer_options or {}, "context": context, "y": y})
        if y is not None:
            context = context + y[:, None, : context.shape[-1]]
        return super().forward(x, t, context)


def make_diffusion_model(seed: int = 0, forge_linear: bool = True) -> DiffusionModel:
    unet = make_unet(seed)
    model = DiffusionModel()
    model.load_state_dict(unet.state_dict())
    if forge_linear:
        model.to_q, model.ff1 = ForgeLinear(model.to_q), ForgeLinear(model.ff1)
    return model.eval()


class KModel(nn.Module):
    """backend/modules/k_model.py: apply_model(x, t=sigma, c_crossattn, ...) returns x0."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        eps = self.diffusion_model(x, t, context=c_crossattn, control=control, transformer_options=transformer_options,
                                   **kwargs)
        return x - t.view(-1, 1, 1, 1) * eps

    def memory_required(self, input_shape):
        return input_shape[0] * input_shape[2] * input_shape[3] * 16384


def _cp(t, wa, wb):
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def _decompose(dora_scale, weight, diff, alpha, strength):
    """weight_decompose: magnitude over the output rows of W, or over the input columns of W + ΔW."""
    diff = diff * alpha
    calc = weight + diff
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True).reshape(
            calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))
    if strength != 1.0:
        weight += strength * (calc - weight)
    else:
        weight[:] = calc
    return weight


def get_free_memory(dev=None, torch_free_too=False):
    """backend/memory_management.py: free bytes on a device (CUDA: the driver's free plus torch's cached free)."""
    return 64 * 2**30


def soft_empty_cache(force=False):
    """backend/memory_management.py: empty the allocator's cache."""


def merge(patches, weight, key="", computation_dtype=torch.float32):
    """backend/patcher/lora.py merge_lora_to_weight (reForge's weight_adapter computes the same): 'diff', 'set',
    'lora' (alpha/rank, Tucker mid, DoRA), 'loha' (Tucker t1/t2), 'lokr' (factored w1/w2, Tucker t2)."""
    weight = weight.clone().float()
    full = weight
    for strength, v, strength_model, offset, _function in (tuple(p)[:5] for p in patches):
        weight = full if offset is None else full.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(getattr(v, "name", None), str):  # reForge adapter object
            v = (v.name, v.weights)
        kind, v = ("diff", v) if len(v) == 1 else v
        if kind == "diff":
            weight += strength * v[0]
        elif kind == "set":
            weight.copy_(v[0])
        elif kind == "lora":
            up, down, alpha, mid, dora = v[0].float(), v[1].float(), v[2], v[3], v[4]
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            if mid is not None:
                final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)).reshape(
                    final).transpose(0, 1)
            diff = torch.mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)
            if dora is not None:
                weight = _decompose(dora.float(), weight, diff, scale, strength)
            else:
                weight += strength * scale * diff
        elif kind == "loha":
            w1a, w1b, alpha, w2a, w2b, t1, t2, dora = v[:8]
            scale = alpha / w1b.shape[0] if alpha is not None else 1.0
            if t1 is not None:
                m1, m2 = _cp(t1, w1a, w1b), _cp(t2, w2a, w2b)
            else:
                m1, m2 = w1a @ w1b, w2a @ w2b
            diff = (m1 * m2).reshape(weight.shape)
            if dora is not None:
                weight = _decompose(dora.float(), weight, diff, scale, strength)
            else:
                weight += strength * scale * diff
        elif kind == "lokr":
            w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora = v[:9]
            dim = None
            if w1 is None:
                dim, w1 = w1b.shape[0], w1a @ w1b
            if w2 is None:
                dim = w2b.shape[0]
                w2 = w2a @ w2b if t2 is None else _cp(t2, w2a, w2b)
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            scale = alpha / dim if alpha is not None and dim is not None else 1.0
            diff = torch.kron(w1, w2).reshape(weight.shape)
            if dora is not None:
                weight = _decompose(dora.float(), weight, diff, scale, strength)
            else:
                weight += strength * scale * diff
        else:
            raise ValueError(kind)
        if offset is None:
            full = weight
    return full


class LoraLoader:
    """backend/patcher/lora.py LoraLoader: one per model, shared by every clone; merges on refresh."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.backup, self.loaded_hash = model, {}, str([])

    @torch.no_grad()
    def refresh(self, lora_patches):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        params = dict(self.model.named_parameters())
        for k, w in self.backup.items():
            params[k].data.copy_(w)
        self.backup = {}
        merged: dict = {}
        for patches in lora_patches.values():
            for key, entries in patches.items():
                merged[key] = merged.get(key, []) + entries
        for key, entries in merged.items():
            self.backup[key] = params[key].detach().clone()
            params[key].data.copy_(merge(entries, params[key].data, key))
        self.loaded_hash = hashes


class ModelPatcher:
    """backend/patcher/base.py ModelPatcher, reduced to what the glue and the fake sampler use."""

    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        self.lora_patches, self.object_patches = {}, {}
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        keys = {k for k, _ in self.model.named_parameters()}
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = {
            k: [[strength_patch, v, strength_model, None, None]] for k, v in patches.items() if k in keys}

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches)

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape)

    def set_model_sampler_cfg_function(self, sampler_cfg_function, disable_cfg1_optimization=False):
        if len(inspect.signature(sampler_cfg_function).parameters) == 3:
            self.model_options["sampler_cfg_function"] = lambda a: sampler_cfg_function(a["cond"], a["uncond"],
                                                                                       a["cond_scale"])
        else:
            self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function


class UnetPatcher(ModelPatcher):
    """backend/patcher/unet.py UnetPatcher."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        return n

    def add_extra_torch_module_during_sampling(self, m, cast_to_unet_dtype=True):
        patcher = ModelPatcher(model=m)
        self.extra_model_patchers_during_sampling.append(patcher)
        return patcher

    def append_model_option(self, k, v):
        self.model_options.setdefault(k, []).append(v)

    def add_conditioning_modifier(self, modifier):
        self.append_model_option("conditioning_modifiers", modifier)

    def set_memory_peak_estimation_modifier(self, modifier):
        self.model_options["memory_peak_estimation_modifier"] = modifier


class ReforgeUnetPatcher(UnetPatcher):
    """reForge modules_forge/unet_patcher.py: `patches` merged per key; uuid and backup shared by clones."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.patches, self.patches_uuid, self.backup = {}, uuid.uuid4(), {}

    def clone(self):
        n = ReforgeUnetPatcher(self.model)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.patches_uuid, n.backup = self.patches_uuid, self.backup
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        for k, v in patches.items():
            self.patches.setdefault(k, []).append((strength_patch, v, strength_model, None, None))
        self.patches_uuid = uuid.uuid4()

    @torch.no_grad()
    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        """model_patcher.patch_weight_to_device: back the weight up (once), then merge its patches into it."""
        if key not in self.patches:
            return
        params = dict(self.model.named_parameters())
        if key not in self.backup:
            self.backup[key] = SimpleNamespace(weight=params[key].detach().clone(), inplace_update=False)
        params[key].data.copy_(merge(self.patches[key], params[key].data, key))

    @torch.no_grad()
    def refresh_loras(self):
        """patch_model: re-patch only when the model's merged uuid differs from ours."""
        if getattr(self.model, "current_weight_patches_uuid", None) == self.patches_uuid:
            return
        params = dict(self.model.named_parameters())
        for k, bk in self.backup.items():
            params[k].data.copy_(bk.weight)
        self.backup.clear()
        for key, entries in self.patches.items():
            self.backup[key] = SimpleNamespace(weight=params[key].detach().clone(), inplace_update=False)
            params[key].data.copy_(merge(entries, params[key].data, key))
        self.model.current_weight_patches_uuid = self.patches_uuid


@dataclass
class LoRAAdapter:
    """ldm_patched/modules/weight_adapter/lora.py: weights = (up, down, alpha, mid, dora_scale, reshape)."""

    weights: tuple
    name: str = "lora"


def lora_patch(lora, reforge=False):
    """A LowRank as the host's loader makes it: ('lora', (up, down, alpha, mid, dora)) or a LoRAAdapter."""
    if reforge:
        return LoRAAdapter((lora.up, lora.down, lora.alpha, lora.mid, None, None))
    return ("lora", (lora.up, lora.down, lora.alpha, lora.mid, None))


@dataclass
class FilePatches:
    """A file's patches as each host's loader builds them (tests/formats.py), for make_host in place of LowRanks."""

    forge: dict
    reforge: dict


def file_patches(loras, reforge=False):
    """{parameter key: patch} of one LoRA file mapped onto KModel keys."""
    if isinstance(loras, FilePatches):
        return loras.reforge if reforge else loras.forge
    return {f"diffusion_model.{name}.weight": lora_patch(lo, reforge) for name, lo in loras.items()}


@dataclass
class Denoiser:
    """The CFG denoiser's step counters (modules/sd_samplers_cfg_denoiser.py)."""

    step: int = 0
    total_steps: int = 0


@dataclass
class Sampler:
    max_chunks: int | None = None  # stands in for free memory in calc_cond_uncond_batch
    calls: list = field(default_factory=list)
    uncond_preds: list = field(default_factory=list)  # the host's own uncond_pred, as post-cfg hooks see it


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options, max_chunks=None, calls=None):
    """sampling_function.py: chunks reversed (uncond first); with little memory, fewer chunks per call."""
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    to_run = [(c, 0) for c in cond] + ([(u, 1) for u in uncond] if uncond is not None else [])
    while to_run:
        first = to_run[0][0]["c_crossattn"].shape
        batchable = [i for i, (c, _) in enumerate(to_run) if c["c_crossattn"].shape == first]
        batchable.reverse()
        to_batch = batchable[:max_chunks] if max_chunks else batchable
        picked = [to_run.pop(i) for i in to_batch]
        kinds = [k for _, k in picked]
        n = len(kinds)
        b = x_in.shape[0]
        to = dict(model_options.get("transformer_options", {}))
        to["cond_or_uncond"], to["sigmas"] = kinds[:], timestep
        to["cond_mark"] = torch.tensor([float(k) for k in kinds for _ in range(b)])
        to["cond_indices"] = [r for i, k in enumerate(kinds) if k == 0 for r in range(i * b, (i + 1) * b)]
        to["uncond_indices"] = [r for i, k in enumerate(kinds) if k == 1 for r in range(i * b, (i + 1) * b)]
        # cond_cat: every model condition joined over the picked chunks (SDXL adds the pooled vector `y`)
        c = {k: torch.cat([p[0][k] for p in picked]) for k in ("c_crossattn", "y") if k in picked[0][0]}
        c["transformer_options"] = to
        input_x, timestep_ = torch.cat([x_in] * n), torch.cat([timestep] * n)
        if calls is not None:
            calls.append(kinds)
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {
                "input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": kinds}).chunk(n)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(n)
        for (entry, kind), o in zip(picked, output, strict=True):
            s = entry.get("strength", 1.0)
            if kind == 0:
                out_cond += o * s
                out_count += s
            else:
                out_uncond += o * s
                out_uncond_count += s
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function(unet, x, sigma, uncond, cond, cond_scale, sampler: Sampler):
    """Forge's sampling_function + sampling_function_inner for one step; returns denoised x0."""
    model, model_options, seed = unet.model, unet.model_options, 0
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, sigma, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, sigma, uncond, cond, cond_scale, model_options, seed)
    edit_strength = sum(item.get("strength", 1) for item in cond)
    skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if skip else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, sigma, model_options,
                                                    sampler.max_chunks, sampler.calls)
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": sigma,
                "input": x, "sigma": sigma, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        sampler.uncond_preds.append(uncond_pred)
        return x - model_options["sampler_cfg_function"](args)
    if not math.isclose(edit_strength, 1.0):
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def make_host(loras, reforge=False, multipliers=None, seed=0):
    """A fake sd_model with forge_objects_original / _after_applying_lora and the Lora extension's module."""
    kmodel = KModel(make_diffusion_model(seed)).eval()
    cls = ReforgeUnetPatcher if reforge else UnetPatcher
    original = cls(kmodel)
    multipliers = multipliers or [1.0] * len(loras)
    unet = original
    targets, nets = [], []
    for i, (lora, mult) in enumerate(zip(loras, multipliers, strict=True)):
        letter = "abcdefgh"[i]
        filename = f"/loras/lora_{letter}.safetensors"
        unet = unet.clone()
        if reforge:
            unet.add_patches(file_patches(lora, True), mult)
        else:
            unet.add_patches(filename=filename, patches=file_patches(lora), strength_patch=mult)
        targets.append([filename, mult, mult])
        nets.append(SimpleNamespace(name=f"lora_{letter}", mentioned_name=f"lora_{letter}",
                                    network_on_disk=SimpleNamespace(filename=filename)))
    sd_model = SimpleNamespace(
        forge_objects_original=SimpleNamespace(unet=original), forge_objects_after_applying_lora=SimpleNamespace(
            unet=unet), current_lora_hash=str(targets))
    sd_model.forge_objects = SimpleNamespace(unet=unet)
    networks_module = SimpleNamespace(loaded_networks=nets)
    return sd_model, networks_module


def reforge_loader(loras, reforge_targets):
    """reForge: one file's patches at a multiplier, as load_lora_for_models on the original patcher gives them."""
    by_file = {t[0]: lo for t, lo in zip(reforge_targets, loras, strict=True)}

    def load_file(filename, multiplier):
        return {k: [(multiplier, v, 1.0, None, None)] for k, v in file_patches(by_file[filename], True).items()}

    return load_file
