"""Small fakes of the A1111 v1.10 objects LoRAtorio touches, written from the host's real signatures.

- `CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)`: the batch layout, callbacks,
  skip-uncond, padding and batch_cond_uncond branches of modules/sd_samplers_cfg_denoiser.py, condensed; SDXL's dict
  conditioning ({"crossattn", "vector"}, joined and sliced per key by catenate_conds / subscript_cond) included.
- The built-in Lora extension: `networks.loaded_networks`, `Network` (name, modules, te/unet multipliers, dyn_dim),
  `NetworkModuleLora` (up_model, down_model, mid_model, multiplier(), calc_scale(), calc_updown(), forward(x, y)),
  and its layers computing with whatever `loaded_networks` holds at forward time (what the merge patch achieves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from loratorio.core import LowRank, merged_weight
from tests.toy import TinyUNet


@dataclass
class CFGDenoiserParams:
    x: torch.Tensor
    image_cond: torch.Tensor
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: object
    text_uncond: object
    denoiser: object = None


@dataclass
class CFGDenoisedParams:
    x: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    inner_model: object


@dataclass
class Opts:
    batch_cond_uncond: bool = True
    skip_early_cond: float = 0.0
    s_min_uncond_all: bool = False


@dataclass
class Callbacks:
    denoiser: list = field(default_factory=list)
    denoised: list = field(default_factory=list)


def catenate_conds(conds):
    """sd_samplers_cfg_denoiser.catenate_conds: SDXL conds are dicts, joined key by key."""
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    """sd_samplers_cfg_denoiser.subscript_cond."""
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


def crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def context_of(sd_model, cond):
    """The UNet's context: SD1.5's c_crossattn, or SDXL's crossattn shifted by its pooled `vector` (which the real
    UNet adds to the time embedding through label_emb). Every call's conditioning is recorded in sd_model.seen_conds.
    """
    sd_model.seen_conds.append(cond)
    if "crossattn" in cond:
        return cond["crossattn"] + cond["vector"][:, None, : cond["crossattn"].shape[-1]]
    return cond["c_crossattn"][0]


class KDiffusionWrap(nn.Module):
    """k-diffusion CompVisDenoiser (an nn.Module): returns denoised x0 for a k-diffusion sigma."""

    def __init__(self, sd_model):
        super().__init__()
        self.inner_model = sd_model
        self.register_buffer("sigmas", torch.linspace(0.1, 10, 10))

    def forward(self, x, sigma, cond):
        eps = self.inner_model.model.diffusion_model(x, sigma, context_of(self.inner_model, cond))
        return x - sigma.view(-1, 1, 1, 1) * eps


class TimestepsWrap(KDiffusionWrap):
    """CompVisTimestepsDenoiser: returns ε for integer-like timesteps."""

    def forward(self, x, t, cond):
        return self.inner_model.model.diffusion_model(x, t, context_of(self.inner_model, cond))


class CFGDenoiser(nn.Module):
    """An nn.Module, as the host's is: `model_wrap` is then a registered child module."""

    wrap_cls = KDiffusionWrap

    def __init__(self, sd_model, opts, callbacks, total_steps):
        super().__init__()
        self.sd_model, self.opts, self.callbacks = sd_model, opts, callbacks
        self.model_wrap = None
        self.step, self.total_steps = 0, total_steps

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = self.wrap_cls(self.sd_model)
        return self.model_wrap

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-crossattn(uncond).shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        """cond: (conds_list, tensor) as reconstruct_multicond_batch returns them; uncond: a tensor (or, on SDXL,
        tensor and uncond are dicts of crossattn and vector)."""
        conds_list, tensor = cond
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        ic_in = torch.cat([torch.stack([image_cond[i]] * n) for i, n in enumerate(repeats)] + [image_cond])
        params = CFGDenoiserParams(x_in, ic_in, sigma_in, self.step, self.total_steps, tensor, uncond, self)
        for cb in self.callbacks.denoiser:
            cb(params)
        x_in, ic_in, sigma_in, tensor, uncond = params.x, params.image_cond, params.sigma, params.text_cond, \
            params.text_uncond
        skip_uncond = False
        if self.opts.skip_early_cond and self.step / self.total_steps <= self.opts.skip_early_cond:
            skip_uncond = True
        elif (self.step % 2 or self.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        def make(c, ic):
            if isinstance(c, dict):
                return {**c, "c_concat": [ic]}
            return {"c_crossattn": [c], "c_concat": [ic]}

        if crossattn(tensor).shape[1] == crossattn(uncond).shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if self.opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make(cond_in, ic_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                                  cond=make(subscript_cond(cond_in, a, b), ic_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            bs = batch_size * 2 if self.opts.batch_cond_uncond else batch_size
            for a in range(0, crossattn(tensor).shape[0], bs):
                b = min(a + bs, crossattn(tensor).shape[0])
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b],
                                              cond=make(subscript_cond(tensor, a, b), ic_in[a:b]))
            if not skip_uncond:
                n = crossattn(uncond).shape[0]
                x_out[-n:] = self.inner_model(x_in[-n:], sigma_in[-n:], cond=make(uncond, ic_in[-n:]))
        firsts = [c[0][0] for c in conds_list]
        if skip_uncond:
            x_out = torch.cat([x_out, torch.cat([x_out[i:i + 1] for i in firsts])])
        denoised_params = CFGDenoisedParams(x_out, self.step, self.total_steps, self.inner_model)
        for cb in self.callbacks.denoised:
            cb(denoised_params)
        scale = 1.0 if skip_uncond else cond_scale
        denoised = self.combine_denoised(x_out, conds_list, uncond, scale)
        self.step += 1
        return denoised



class CFGDenoiserTimesteps(CFGDenoiser):
    wrap_cls = TimestepsWrap

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_in - x_out


class NetworkModuleLora:
    """network_lora.NetworkModuleLora's surface: factor modules plus the scale/multiplier methods."""

    def __init__(self, net, layer, lora: LowRank):
        self.network, self.lora = net, lora
        self.dim, self.alpha, self.scale, self.bias, self.dora_scale = lora.rank, lora.alpha, None, None, None
        conv = isinstance(layer, nn.Conv2d)
        self.down_model = SimpleNamespace(weight=lora.down if conv or lora.down.dim() == 2 else lora.down.flatten(1))
        self.up_model = SimpleNamespace(weight=lora.up)
        self.mid_model = None if lora.mid is None else SimpleNamespace(weight=lora.mid)
        self.layer = layer

    def multiplier(self):
        return self.network.unet_multiplier

    def calc_scale(self):
        return self.alpha / self.dim if self.alpha is not None else 1.0

    def _as_lowrank(self):
        return LowRank(self.lora.down, self.lora.up, None, self.lora.mid, self.multiplier() * self.calc_scale())

    def calc_updown(self, orig_weight):
        return merged_weight(self.layer, self._as_lowrank()), None

    def forward(self, x, y):
        return self._as_lowrank().apply(self.layer, x, y.clone())


class NetworkModuleDense(NetworkModuleLora):
    """A LoHa/LoKr-like module: no factors the glue can route, only calc_updown and the generic forward."""

    def __init__(self, net, layer, lora):
        super().__init__(net, layer, lora)
        del self.up_model, self.down_model, self.mid_model


class Network:
    def __init__(self, name, modules_by_layer, sd_model, unet_multiplier=1.0, dense=False):
        self.name = self.mentioned_name = name
        self.te_multiplier, self.unet_multiplier, self.dyn_dim = 1.0, unet_multiplier, None
        cls = NetworkModuleDense if dense else NetworkModuleLora
        self.modules = {key(name_): cls(self, sd_model.model.diffusion_model.get_submodule(name_), lora)
                        for name_, lora in modules_by_layer.items()}


def key(module_name):
    return "diffusion_model_" + module_name.replace(".", "_")


class NetworksModule:
    """The `networks` module: loaded_networks is what the layers merge at forward time."""

    def __init__(self):
        self.loaded_networks = []


def make_sd_model(unet: TinyUNet, networks_module: NetworksModule):
    """An sd_model whose UNet layers apply loaded_networks at forward time, as the host's patched layers do."""
    sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), cond_stage_key="crossattn", seen_conds=[])
    sd_model.network_layer_mapping = {key(n): m for n, m in unet.named_modules() if n}

    def host_lora(module, inputs, output):
        name = getattr(module, "network_layer_name", None)
        for net in networks_module.loaded_networks:
            nm = net.modules.get(name)
            if nm is not None:
                output = nm.forward(inputs[0], output)
        return output

    for k, m in sd_model.network_layer_mapping.items():
        m.network_layer_name = k
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(host_lora)
    return sd_model
