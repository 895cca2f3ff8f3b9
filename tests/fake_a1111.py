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
import torch.nn.functional as F
from torch import nn

from loratorio.core import LowRank
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


class NetworkModule:
    """network.NetworkModule's surface and maths: calc_scale(), multiplier(), finalize_updown() (bias, alpha scale,
    DoRA's apply_weight_decompose, multiplier) and the generic forward y + op(x, ΔW, Δb)."""

    def __init__(self, net, layer, w):
        self.network, self.sd_module, self.layer = net, layer, layer
        self.shape = layer.weight.shape
        self.dim = None
        self.bias = w.get("bias")
        self.alpha = w["alpha"].item() if "alpha" in w else None
        self.scale = w["scale"].item() if "scale" in w else None
        self.dora_scale = w.get("dora_scale")
        self.dora_norm_dims = len(self.shape) - 1

    def multiplier(self):
        return self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def apply_weight_decompose(self, updown, orig_weight):
        merged = updown + orig_weight.to(updown.dtype)
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * self.dora_norm_dims).transpose(0, 1)
        return merged * (self.dora_scale / norm) - orig_weight

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if self.bias is not None:
            updown = (updown.reshape(self.bias.shape) + self.bias).reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        if ex_bias is not None:
            ex_bias = ex_bias * self.multiplier()
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)
        return updown * self.multiplier(), ex_bias

    def forward(self, x, y):
        updown, ex_bias = self.calc_updown(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            return y + F.conv2d(x, updown, ex_bias, stride=self.layer.stride, padding=self.layer.padding)
        if isinstance(self.layer, nn.GroupNorm):
            return y + F.group_norm(x, self.layer.num_groups, updown, ex_bias, self.layer.eps)
        if isinstance(self.layer, nn.LayerNorm):
            return y + F.layer_norm(x, self.layer.normalized_shape, updown, ex_bias, self.layer.eps)
        return y + F.linear(x, updown, ex_bias)


def _cp(t, wa, wb):
    """lyco_helpers.make_weight_cp."""
    return torch.einsum("i j k l, i r -> r j k l", torch.einsum("i j k l, j r -> i r k l", t, wb), wa)


class NetworkModuleLora(NetworkModule):
    """network_lora.NetworkModuleLora: factor modules; calc_updown by rebuild_conventional / rebuild_cp."""

    def __init__(self, net, layer, lora: LowRank, dora_scale=None):
        w = {"alpha": torch.tensor(float(lora.alpha))} if lora.alpha is not None else {}
        if dora_scale is not None:
            w["dora_scale"] = dora_scale
        super().__init__(net, layer, w)
        self.lora = lora
        conv = isinstance(layer, nn.Conv2d)
        self.down_model = SimpleNamespace(weight=lora.down if conv or lora.down.dim() == 2 else lora.down.flatten(1))
        self.up_model = SimpleNamespace(weight=lora.up)
        self.mid_model = None if lora.mid is None else SimpleNamespace(weight=lora.mid)
        self.dim = lora.rank

    def calc_updown(self, orig_weight):
        up, down = self.up_model.weight, self.down_model.weight
        shape = [up.size(0), down.size(1)]
        if self.mid_model is not None:
            mid = self.mid_model.weight
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1))
            shape += mid.shape[2:]
        else:
            if down.dim() == 4:
                shape += down.shape[2:]
            updown = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        return self.finalize_updown(updown, orig_weight, shape)


class NetworkModuleDense(NetworkModuleLora):
    """A module with no factors the glue knows (OFT, GLoRA…): only calc_updown and the generic forward."""

    def __init__(self, net, layer, lora):
        super().__init__(net, layer, lora)
        self.up_model = self.down_model = self.mid_model = None
        self._mine = (lora.up, lora.down, lora.mid)

    def calc_updown(self, orig_weight):
        self.up_model, self.down_model = SimpleNamespace(weight=self._mine[0]), SimpleNamespace(
            weight=self._mine[1] if isinstance(self.layer, nn.Conv2d) or self._mine[1].dim() == 2
            else self._mine[1].flatten(1))
        self.mid_model = None if self._mine[2] is None else SimpleNamespace(weight=self._mine[2])
        try:
            return super().calc_updown(orig_weight)
        finally:
            self.up_model = self.down_model = self.mid_model = None

    def forward(self, x, y):
        return NetworkModule.forward(self, x, y)


class NetworkModuleHada(NetworkModule):
    """network_hada: (w1a·w1b) ⊙ (w2a·w2b), Tucker t1/t2 through make_weight_cp."""

    def __init__(self, net, layer, w):
        super().__init__(net, layer, w)
        self.w1a, self.w1b, self.w2a, self.w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        self.t1, self.t2 = w.get("hada_t1"), w.get("hada_t2")
        self.dim = self.w1b.shape[0]

    def calc_updown(self, orig_weight):
        shape = [self.w1a.size(0), self.w1b.size(1)]
        if self.t1 is not None:
            shape = [self.w1a.size(1), self.w1b.size(1), *self.t1.shape[2:]]
            up1 = _cp(self.t1, self.w1a, self.w1b)
        else:
            if self.w1b.dim() == 4:
                shape += self.w1b.shape[2:]
            up1 = (self.w1a.flatten(1) @ self.w1b.flatten(1)).reshape(shape)
        up2 = _cp(self.t2, self.w2a, self.w2b) if self.t2 is not None else \
            (self.w2a.flatten(1) @ self.w2b.flatten(1)).reshape(shape)
        return self.finalize_updown(up1 * up2, orig_weight, shape)


class NetworkModuleLokr(NetworkModule):
    """network_lokr: kron(w1, w2) with either factor low-rank (w2 possibly Tucker), alpha/dim of the last factor."""

    def __init__(self, net, layer, w):
        super().__init__(net, layer, w)
        self.w1, self.w1a, self.w1b = w.get("lokr_w1"), w.get("lokr_w1_a"), w.get("lokr_w1_b")
        self.dim = self.w1b.shape[0] if self.w1b is not None else self.dim
        self.w2, self.w2a, self.w2b = w.get("lokr_w2"), w.get("lokr_w2_a"), w.get("lokr_w2_b")
        self.dim = self.w2b.shape[0] if self.w2b is not None else self.dim
        self.t2 = w.get("lokr_t2")

    def calc_updown(self, orig_weight):
        w1 = self.w1 if self.w1 is not None else self.w1a @ self.w1b
        if self.w2 is not None:
            w2 = self.w2
        elif self.t2 is None:
            w2 = self.w2a @ self.w2b
        else:
            w2 = _cp(self.t2, self.w2a, self.w2b)
        shape = orig_weight.shape if orig_weight.dim() == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return self.finalize_updown(torch.kron(w1, w2.contiguous()).reshape(shape), orig_weight, shape)


class NetworkModuleIa3(NetworkModule):
    """network_ia3: ΔW = W·w on output rows (or input columns when on_input)."""

    def __init__(self, net, layer, w):
        super().__init__(net, layer, w)
        self.w, self.on_input = w["weight"], w["on_input"].item()

    def calc_updown(self, orig_weight):
        w = self.w
        shape = [w.size(0), orig_weight.size(1)]
        if self.on_input:
            shape.reverse()
        else:
            w = w.reshape(-1, 1)
        return self.finalize_updown(orig_weight * w, orig_weight, shape)


class NetworkModuleFull(NetworkModule):
    """network_full: the diff itself, and diff_b as the bias delta."""

    def __init__(self, net, layer, w):
        super().__init__(net, layer, w)
        self.weight, self.ex_bias = w["diff"], w.get("diff_b")

    def calc_updown(self, orig_weight):
        return self.finalize_updown(self.weight, orig_weight, self.weight.shape, self.ex_bias)


class NetworkModuleNorm(NetworkModule):
    """network_norm: w_norm/b_norm as the norm's weight and bias deltas."""

    def __init__(self, net, layer, w):
        super().__init__(net, layer, w)
        self.w_norm, self.b_norm = w["w_norm"], w.get("b_norm")

    def calc_updown(self, orig_weight):
        return self.finalize_updown(self.w_norm, orig_weight, self.w_norm.shape, self.b_norm)


MODULE_TYPES = {"hada": NetworkModuleHada, "lokr": NetworkModuleLokr, "ia3": NetworkModuleIa3,
                "full": NetworkModuleFull, "norm": NetworkModuleNorm}


class Network:
    """modules_by_layer: {layer name: LowRank} (LoRA modules), or {layer name: (type, weights dict)} for the other
    module types, the weights keyed as in the file (hada_w1_a, lokr_w1, dora_scale, alpha…)."""

    def __init__(self, name, modules_by_layer, sd_model, unet_multiplier=1.0, dense=False):
        self.name = self.mentioned_name = name
        self.te_multiplier, self.unet_multiplier, self.dyn_dim = 1.0, unet_multiplier, None
        self.modules = {}
        for layer_name, spec in modules_by_layer.items():
            layer = sd_model.model.diffusion_model.get_submodule(layer_name)
            if isinstance(spec, LowRank):
                nm = (NetworkModuleDense if dense else NetworkModuleLora)(self, layer, spec)
            elif spec[0] == "lora":
                w = spec[1]
                nm = NetworkModuleLora(self, layer, w["lora"], w.get("dora_scale"))
            else:
                nm = MODULE_TYPES[spec[0]](self, layer, spec[1])
            self.modules[key(layer_name)] = nm


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
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
            m.register_forward_hook(host_lora)
    return sd_model
