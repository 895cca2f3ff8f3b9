#!/usr/bin/env python3
"""Random-weight test models for the real-WebUI tests: `python tests/webui/make_models.py MODELS_DIR --arch sdxl`.

Any python with torch and numpy runs it (a WebUI's venv does); nothing is downloaded. Writes, under MODELS_DIR:

--arch sd15 (about 2 GiB, 1-2 minutes)
  Stable-diffusion/sd15-random.safetensors   SD1.5 in the original LDM layout (UNet 686 keys / 859.52M params,
      AutoencoderKL 248 keys, CLIP ViT-L/14 text encoder under cond_stage_model.transformer.text_model.*), shaped as
      configs/v1-inference.yaml;
  Lora/{styleA,charB,conceptC}.safetensors   kohya LoRAs (lora_unet_<diffusers path>), UNet only, rank 4/8/6, on
      attn1/attn2 q/k/v/out, ff and proj_in/out of all 16 transformers;
  Lora/lohaD.safetensors                     a LoHa on 24 attention projections.
  The same files as ../shared/webui-rig/make_models.py writes (same tensors for the same seed).

--arch sdxl (about 6.5 GiB, a few minutes; memory stays small: tensors are written one at a time)
  Stable-diffusion/sdxl-random.safetensors   SDXL base in the original single-file (sgm) layout, shaped as
      generative-models' configs/inference/sd_xl_base.yaml: model.diffusion_model.* (UNet 1680 keys / 2567.46M
      params, label_emb for the 2816-wide `vector`), conditioner.embedders.0.transformer.text_model.* (CLIP ViT-L/14,
      HF names),
      conditioner.embedders.1.model.* (OpenCLIP ViT-bigG/14 text tower, open_clip names: resblocks with a fused
      in_proj, text_projection, ln_final), first_stage_model.* (the SD VAE); fp16 unless --fp32;
  Lora/xl_styleA.safetensors   kohya LoRA, UNet only (lora_unet_<sgm path>, as kohya's SDXL trainer names them):
      attn1/attn2 q/k/v/out and ff of the first block of every transformer, and its proj_in/proj_out;
  Lora/xl_charB.safetensors    kohya LoRA with text-encoder parts on both encoders: UNet cross-attention (attn2) of the
      first block of every transformer, lora_te1_* (CLIP-L, all 12 layers) and lora_te2_* (bigG, every 4th layer and
      the last, which only the pooled `vector` reads): self_attn q/k/v/out_proj, mlp fc1/fc2;
  Lora/xl_loconC.safetensors   LoCon: 3×3 conv factors (lora_down r×in×3×3, lora_up out×r×1×1) on the resnets of the
      320-channel levels and on the middle block, plus attn1 of the first block of every transformer.
  Detected as SDXL base by A1111 v1.10 (modules/sd_models_config.py reads conditioner.embedders.1.model.ln_final),
  Forge (huggingface_guess: unet_config transformer_depth [0, 0, 2, 2, 10, 10], context_dim 2048, adm_in_channels 2816)
  and reForge (ldm_patched model_detection, the same unet_config). The LoRAs cover only part of the layers a trained
  SDXL LoRA covers: the hosts keep an fp32 backup of every layer a LoRA touches, and the model alone is 14 GB in fp32.

Initialisation (deterministic: every tensor has its own generator, seeded from --seed and its key): norm weights 1,
biases 0; Linear/Conv weights normal(0, 1/sqrt(fan_in)); biases normal(0, 0.02); the layers the original code
initialises to zero (ResBlock out_layers.3, SpatialTransformer proj_out, UNet out.2) get normal(0, 0.5/sqrt(fan_in))
so that the output depends on input, prompt and LoRAs; the final layer norm bias of every text encoder is
0.1 + normal(0, 0.1), never 0: with bias 0 each token of a normed output has mean 0, and a prompt's mean can round to
exactly 0.0, which the hosts' "Original" emphasis (z * original_mean / new_mean) turns into 0/0 = NaN (a black image).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib

import torch

ZERO_GAIN = 0.5  # scale of the layers that the original code initialises to zero
BIAS_STD = 0.02
FINAL_LN_BIAS_MEAN, FINAL_LN_BIAS_STD = 0.1, 0.1  # text encoders' final layer norm bias (must not be all zero)
UNET = "model.diffusion_model."

# A spec is an ordered {key: (shape, kind)}; kind: w (weight), z (zero-initialised weight), b (bias), nw/nb (norm),
# fnb (final norm bias of a text encoder), emb/pos (token/position embedding), ids (position_ids), one (a scalar 1).


class Spec(dict):
    """{key: (shape, kind)} with helpers for the layer kinds the models use."""

    def conv(self, p: str, cin: int, cout: int, k: int, kind: str = "w") -> None:
        self[p + ".weight"] = ((cout, cin, k, k), kind)
        self[p + ".bias"] = ((cout,), "b")

    def lin(self, p: str, cin: int, cout: int, bias: bool = True, kind: str = "w") -> None:
        self[p + ".weight"] = ((cout, cin), kind)
        if bias:
            self[p + ".bias"] = ((cout,), "b")

    def norm(self, p: str, c: int) -> None:
        self[p + ".weight"] = ((c,), "nw")
        self[p + ".bias"] = ((c,), "nb")


# ------------------------------------------------------------------------------------------------------------------
# UNet: ldm/sgm openaimodel.UNetModel


SD15_UNET = {"mult": (1, 2, 4, 4), "attn_ds": (1, 2, 4), "depth": (1, 1, 1, 1), "ctx": 768, "linear": False,
             "adm": None}
SDXL_UNET = {"mult": (1, 2, 4), "attn_ds": (2, 4), "depth": (1, 2, 10), "ctx": 2048, "linear": True, "adm": 2816}


def unet_spec(mult: tuple, attn_ds: tuple, depth: tuple, ctx: int, linear: bool, adm: int | None) -> Spec:
    """UNetModel's state dict shapes (model_channels 320, 2 res blocks per level, legacy=False key layout)."""
    mc, nres = 320, 2
    tec = 4 * mc
    s = Spec()

    def resblock(p: str, cin: int, cout: int) -> None:
        s.norm(p + ".in_layers.0", cin)
        s.conv(p + ".in_layers.2", cin, cout, 3)
        s.lin(p + ".emb_layers.1", tec, cout)
        s.norm(p + ".out_layers.0", cout)
        s.conv(p + ".out_layers.3", cout, cout, 3, "z")
        if cin != cout:
            s.conv(p + ".skip_connection", cin, cout, 1)

    def transformer(p: str, c: int, blocks: int) -> None:
        s.norm(p + ".norm", c)
        if linear:
            s.lin(p + ".proj_in", c, c)
        else:
            s.conv(p + ".proj_in", c, c, 1)
        for i in range(blocks):
            t = f"{p}.transformer_blocks.{i}"
            # state_dict order of BasicTransformerBlock: attn1, ff, attn2, norm1, norm2, norm3
            for a, kv_in in (("attn1", c), ("attn2", ctx)):
                s.lin(f"{t}.{a}.to_q", c, c, bias=False)
                s.lin(f"{t}.{a}.to_k", kv_in, c, bias=False)
                s.lin(f"{t}.{a}.to_v", kv_in, c, bias=False)
                s.lin(f"{t}.{a}.to_out.0", c, c)
                if a == "attn1":
                    s.lin(t + ".ff.net.0.proj", c, c * 8)
                    s.lin(t + ".ff.net.2", c * 4, c)
            for n in ("norm1", "norm2", "norm3"):
                s.norm(f"{t}.{n}", c)
        if linear:
            s.lin(p + ".proj_out", c, c, kind="z")
        else:
            s.conv(p + ".proj_out", c, c, 1, "z")

    s.lin("time_embed.0", mc, tec)
    s.lin("time_embed.2", tec, tec)
    if adm:
        s.lin("label_emb.0.0", adm, tec)
        s.lin("label_emb.0.2", tec, tec)
    s.conv("input_blocks.0.0", 4, mc, 3)
    chans, ch, ds, idx = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nres):
            resblock(f"input_blocks.{idx}.0", ch, m * mc)
            ch = m * mc
            if ds in attn_ds:
                transformer(f"input_blocks.{idx}.1", ch, depth[level])
            chans.append(ch)
            idx += 1
        if level != len(mult) - 1:
            s.conv(f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            ds *= 2
            idx += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch, depth[-1])
    resblock("middle_block.2", ch, ch)
    idx = 0
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(nres + 1):
            resblock(f"output_blocks.{idx}.0", ch + chans.pop(), m * mc)
            ch = m * mc
            j = 1
            if ds in attn_ds:
                transformer(f"output_blocks.{idx}.1", ch, depth[level])
                j = 2
            if level and i == nres:
                s.conv(f"output_blocks.{idx}.{j}.conv", ch, ch, 3)
                ds //= 2
            idx += 1
    s.norm("out.0", mc)
    s.conv("out.2", mc, 4, 3, "z")
    return s


def vae_spec() -> Spec:
    """AutoencoderKL (ch 128, ch_mult [1,2,4,4], 2 res blocks, z 4, double_z), the same for SD1.5 and SDXL."""
    s = Spec()
    ch, mult, nres, z = 128, (1, 2, 4, 4), 2, 4

    def res(p: str, cin: int, cout: int) -> None:
        s.norm(p + ".norm1", cin)
        s.conv(p + ".conv1", cin, cout, 3)
        s.norm(p + ".norm2", cout)
        s.conv(p + ".conv2", cout, cout, 3)
        if cin != cout:
            s.conv(p + ".nin_shortcut", cin, cout, 1)

    def attn(p: str, c: int) -> None:
        s.norm(p + ".norm", c)
        for n in ("q", "k", "v", "proj_out"):
            s.conv(f"{p}.{n}", c, c, 1)

    e = "encoder"
    s.conv(e + ".conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            res(f"{e}.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            s.conv(f"{e}.down.{i}.downsample.conv", cin, cin, 3)
    res(e + ".mid.block_1", cin, cin)
    attn(e + ".mid.attn_1", cin)
    res(e + ".mid.block_2", cin, cin)
    s.norm(e + ".norm_out", cin)
    s.conv(e + ".conv_out", cin, 2 * z, 3)
    d = "decoder"
    cin = ch * mult[-1]
    s.conv(d + ".conv_in", z, cin, 3)
    res(d + ".mid.block_1", cin, cin)
    attn(d + ".mid.attn_1", cin)
    res(d + ".mid.block_2", cin, cin)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            res(f"{d}.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            s.conv(f"{d}.up.{i}.upsample.conv", cin, cin, 3)
    s.norm(d + ".norm_out", cin)
    s.conv(d + ".conv_out", cin, 3, 3)
    s.conv("quant_conv", 2 * z, 2 * z, 1)
    s.conv("post_quant_conv", z, z, 1)
    return s


def clip_l_spec() -> Spec:
    """transformers' CLIPTextModel, openai/clip-vit-large-patch14 text config (768 wide, 12 layers, 77 tokens)."""
    s = Spec()
    d, ff, layers, vocab, npos = 768, 3072, 12, 49408, 77
    t = "text_model"
    s[t + ".embeddings.token_embedding.weight"] = ((vocab, d), "emb")
    s[t + ".embeddings.position_embedding.weight"] = ((npos, d), "pos")
    s[t + ".embeddings.position_ids"] = ((1, npos), "ids")
    for i in range(layers):
        p = f"{t}.encoder.layers.{i}"
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s.lin(f"{p}.self_attn.{n}", d, d)
        s.norm(p + ".layer_norm1", d)
        s.lin(p + ".mlp.fc1", d, ff)
        s.lin(p + ".mlp.fc2", ff, d)
        s.norm(p + ".layer_norm2", d)
    s.norm(t + ".final_layer_norm", d)
    s[t + ".final_layer_norm.bias"] = ((d,), "fnb")
    return s


def open_clip_bigg_spec() -> Spec:
    """open_clip's ViT-bigG-14 text tower (1280 wide, 32 layers, 20 heads), as FrozenOpenCLIPEmbedder2 keeps it."""
    s = Spec()
    d, ff, layers, vocab, npos = 1280, 5120, 32, 49408, 77
    s["positional_embedding"] = ((npos, d), "pos")
    s["text_projection"] = ((d, d), "proj")
    s["token_embedding.weight"] = ((vocab, d), "emb")
    s["logit_scale"] = ((), "one")
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        s.norm(p + ".ln_1", d)
        s[p + ".attn.in_proj_weight"] = ((3 * d, d), "w")
        s[p + ".attn.in_proj_bias"] = ((3 * d,), "b")
        s.lin(p + ".attn.out_proj", d, d)
        s.norm(p + ".ln_2", d)
        s.lin(p + ".mlp.c_fc", d, ff)
        s.lin(p + ".mlp.c_proj", ff, d)
    s.norm("ln_final", d)
    s["ln_final.bias"] = ((d,), "fnb")
    return s


def prefixed(prefix: str, spec: Spec) -> Spec:
    return Spec((prefix + k, v) for k, v in spec.items())


def sd15_spec() -> Spec:
    return Spec({**prefixed(UNET, unet_spec(**SD15_UNET)), **prefixed("first_stage_model.", vae_spec()),
                 **prefixed("cond_stage_model.transformer.", clip_l_spec())})


def sdxl_spec() -> Spec:
    return Spec({**prefixed(UNET, unet_spec(**SDXL_UNET)),
                 **prefixed("conditioner.embedders.0.transformer.", clip_l_spec()),
                 **prefixed("conditioner.embedders.1.model.", open_clip_bigg_spec()),
                 **prefixed("first_stage_model.", vae_spec())})


def params(spec: Spec, prefix: str = "") -> int:
    return sum(math.prod(sh) for k, (sh, kind) in spec.items() if k.startswith(prefix) and kind != "ids")


# ------------------------------------------------------------------------------------------------------------------
# tensors


def generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(key.encode())) % (2 ** 63))


def fan_in(shape: tuple) -> int:
    return shape[1] * math.prod(shape[2:])


def make_tensor(key: str, shape: tuple, kind: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if kind == "nw":
        return torch.ones(shape, dtype=dtype)
    if kind == "nb":
        return torch.zeros(shape, dtype=dtype)
    if kind == "one":
        return torch.ones(shape, dtype=dtype)
    if kind == "ids":
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    g = generator(seed, key)
    if kind == "fnb":
        return (FINAL_LN_BIAS_MEAN + torch.randn(shape, generator=g) * FINAL_LN_BIAS_STD).to(dtype)
    if kind == "proj":  # open_clip's text_projection is used as x @ P: its fan-in is the first axis
        std = 1.0 / math.sqrt(shape[0])
    else:
        std = {"w": 1.0 / math.sqrt(fan_in(shape)) if len(shape) > 1 else 0.0,
               "z": ZERO_GAIN / math.sqrt(fan_in(shape)) if len(shape) > 1 else 0.0,
               "b": BIAS_STD, "emb": 0.5, "pos": 0.1}[kind]
    return (torch.randn(shape, generator=g) * std).to(dtype)


def weight_std(shape: tuple, kind: str) -> float:
    return (ZERO_GAIN if kind == "z" else 1.0) / math.sqrt(fan_in(shape))


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str]) -> None:
    """Write a .safetensors file one tensor at a time; `tensors` maps key -> (shape, dtype, () -> tensor).

    The format (8-byte little-endian header size, JSON header, raw little-endian data) is written directly so that a
    7 GB checkpoint never has to be held in memory at once.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, (shape, dtype, _) in tensors.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, (shape, dtype, make) in tensors.items():
            t = make().contiguous()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{key}: made {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)


def write_checkpoint(path: str, spec: Spec, seed: int, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    def lazy(key: str, shape: tuple, kind: str):
        return lambda: make_tensor(key, shape, kind, seed, dtype)

    tensors = {k: (sh, torch.int64 if kind == "ids" else dtype, lazy(k, sh, kind)) for k, (sh, kind) in spec.items()}
    write_safetensors(path, tensors, metadata)


# ------------------------------------------------------------------------------------------------------------------
# LoRA targets: [(kohya name, weight key in the checkpoint, kind of weight)]


def sd15_transformer_prefixes() -> list[tuple[str, str]]:
    """(compvis prefix, diffusers prefix) of SD1.5's 16 SpatialTransformers."""
    out = []
    for b in range(3):  # down_blocks 0-2 have attentions 0-1 -> input_blocks 1+3b+a, .1
        for a in range(2):
            out.append((f"input_blocks.{1 + 3 * b + a}.1", f"down_blocks.{b}.attentions.{a}"))
    out.append(("middle_block.1", "mid_block.attentions.0"))
    for b in range(1, 4):  # up_blocks 1-3 have attentions 0-2 -> output_blocks 3b+a, .1
        for a in range(3):
            out.append((f"output_blocks.{3 * b + a}.1", f"up_blocks.{b}.attentions.{a}"))
    return out


ATTN1 = [f"attn1.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
ATTN2 = [f"attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
FF = ["ff.net.0.proj", "ff.net.2"]


def sd15_lora_targets(parts: list[str], which: set[int] | None = None,
                      with_proj: bool = True) -> list[tuple[str, str]]:
    """SD1.5 kohya names (diffusers module paths) -> checkpoint keys."""
    out = []
    for i, (cv, df) in enumerate(sd15_transformer_prefixes()):
        if which is not None and i not in which:
            continue
        names = ["transformer_blocks.0." + p for p in parts]
        if with_proj:
            names = ["proj_in", *names, "proj_out"]
        out += [("lora_unet_" + f"{df}.{n}".replace(".", "_"), f"{UNET}{cv}.{n}.weight") for n in names]
    return out


def sdxl_transformers(spec: Spec) -> list[str]:
    """The sgm paths of SDXL's SpatialTransformers (11: input 4, 5, 7, 8; middle; output 0-5)."""
    return sorted({k[len(UNET):].split(".proj_in")[0] for k in spec if k.startswith(UNET) and ".proj_in." in k})


def sdxl_unet_targets(spec: Spec, parts: list[str], proj: bool) -> list[tuple[str, str]]:
    """kohya's SDXL names (lora_unet_ + the sgm path with '_' for '.') -> checkpoint keys, block 0 of each."""
    out = []
    for t in sdxl_transformers(spec):
        names = [f"transformer_blocks.0.{p}" for p in parts]
        if proj:
            names = ["proj_in", *names, "proj_out"]
        out += [("lora_unet_" + f"{t}.{n}".replace(".", "_"), f"{UNET}{t}.{n}.weight") for n in names]
    return out


def sdxl_conv_targets(spec: Spec) -> list[tuple[str, str]]:
    """The 3×3 resnet convs of the 320-channel levels (input 1-2, output 6-8) and of the middle block."""
    blocks = ["input_blocks.1.0", "input_blocks.2.0", "middle_block.0", "middle_block.2", "output_blocks.6.0",
              "output_blocks.7.0", "output_blocks.8.0"]
    return [("lora_unet_" + f"{b}.{c}".replace(".", "_"), f"{UNET}{b}.{c}.weight") for b in blocks
            for c in ("in_layers.2", "out_layers.3")]


TE_PARTS = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2, "self_attn_out_proj": None,
            "mlp_fc1": None, "mlp_fc2": None}


def te_targets(spec: Spec, encoder: int, layers: list[int]) -> list[tuple[str, str, tuple]]:
    """kohya text-encoder names (HF CLIPTextModel paths for both encoders) -> (checkpoint key, shape of the part)."""
    out = []
    for i in layers:
        for part, qkv in TE_PARTS.items():
            name = f"lora_te{encoder + 1}_text_model_encoder_layers_{i}_{part}"
            if encoder == 0:
                hf = part.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
                key = f"conditioner.embedders.0.transformer.text_model.encoder.layers.{i}.{hf}.weight"
                out.append((name, key, spec[key][0]))
                continue
            p = f"conditioner.embedders.1.model.transformer.resblocks.{i}"
            oc = {"self_attn_out_proj": "attn.out_proj.weight", "mlp_fc1": "mlp.c_fc.weight",
                  "mlp_fc2": "mlp.c_proj.weight"}.get(part, "attn.in_proj_weight")
            shape = spec[f"{p}.{oc}"][0]
            if qkv is not None:  # q, k and v are thirds of the fused in_proj
                shape = (shape[0] // 3, shape[1])
            out.append((name, f"{p}.{oc}", shape))
    return out


# ------------------------------------------------------------------------------------------------------------------
# LoRA files


def lowrank_pair(name: str, shape: tuple, kind: str, seed: int, rank: int, rel: float,
                 dtype: torch.dtype) -> tuple[dict, float]:
    """kohya lora_down/lora_up/alpha for one layer with |ΔW|/|W| ≈ rel·[0.75, 1.25] (alpha = rank/2)."""
    out_c, in_c = shape[0], fan_in(shape)
    g = generator(seed, name)
    down = torch.randn(rank, in_c, generator=g) / math.sqrt(in_c)
    up = torch.randn(out_c, rank, generator=g)
    alpha = float(rank) / 2
    scale = alpha / rank
    dw = (up @ down) * scale
    w_norm = weight_std(shape, kind) * math.sqrt(out_c * in_c)
    target = rel * (0.75 + 0.5 * torch.rand(1, generator=g).item())
    up *= target * w_norm / dw.norm().item()
    ratio = ((up @ down) * scale).norm().item() / w_norm
    if len(shape) == 4:  # convs: k×k down (LoCon; 1×1 for SD1.5's proj_in/out), 1×1 up
        d, u = down.reshape(rank, *shape[1:]), up.reshape(out_c, rank, 1, 1)
    else:
        d, u = down, up
    sd = {name + ".lora_down.weight": d.to(dtype), name + ".lora_up.weight": u.to(dtype),
          name + ".alpha": torch.tensor(alpha, dtype=dtype)}
    return sd, ratio


def make_lora(spec: Spec, targets: list[tuple[str, str]], seed: int, rank: int, rel: float,
              dtype: torch.dtype = torch.float16) -> tuple[dict, list[float]]:
    sd, ratios = {}, []
    for name, wkey in targets:
        shape, kind = spec[wkey]
        part, ratio = lowrank_pair(name, shape, kind, seed, rank, rel, dtype)
        sd.update(part)
        ratios.append(ratio)
    return sd, ratios


def make_te_lora(spec: Spec, targets: list[tuple[str, str, tuple]], seed: int, rank: int, rel: float,
                 dtype: torch.dtype = torch.float16) -> tuple[dict, list[float]]:
    sd, ratios = {}, []
    for name, wkey, shape in targets:
        part, ratio = lowrank_pair(name, shape, spec[wkey][1], seed, rank, rel, dtype)
        sd.update(part)
        ratios.append(ratio)
    return sd, ratios


def make_loha(spec: Spec, targets: list[tuple[str, str]], seed: int, rank: int, rel: float,
              dtype: torch.dtype = torch.float16) -> tuple[dict, list[float]]:
    sd, ratios = {}, []
    for kohya, wkey in targets:
        shape, kind = spec[wkey]
        out_c, in_c = shape[0], fan_in(shape)
        g = generator(seed, kohya)
        w1a, w1b = torch.randn(out_c, rank, generator=g), torch.randn(rank, in_c, generator=g)
        w2a, w2b = torch.randn(out_c, rank, generator=g), torch.randn(rank, in_c, generator=g)
        alpha = float(rank)
        dw = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank)
        w_norm = weight_std(shape, kind) * math.sqrt(out_c * in_c)
        f = math.sqrt(rel * w_norm / dw.norm().item())  # spread the factor over w1a and w2a
        w1a *= f
        w2a *= f
        ratios.append(((w1a @ w1b) * (w2a @ w2b) * (alpha / rank)).norm().item() / w_norm)
        sd.update({kohya + ".hada_w1_a": w1a.to(dtype), kohya + ".hada_w1_b": w1b.to(dtype),
                   kohya + ".hada_w2_a": w2a.to(dtype), kohya + ".hada_w2_b": w2b.to(dtype),
                   kohya + ".alpha": torch.tensor(alpha, dtype=dtype)})
    return sd, ratios


def lora_jobs(arch: str, spec: Spec, seed: int) -> list[tuple[str, dict, dict, list[float]]]:
    """(name, state dict, metadata, |ΔW|/|W| per module) for each LoRA file of an architecture."""
    jobs = []
    if arch == "sd15":
        lora_parts = [*ATTN1, *ATTN2, *FF]
        for i, (name, rank, rel) in enumerate((("styleA", 4, 0.07), ("charB", 8, 0.08), ("conceptC", 6, 0.06))):
            s = seed * 31 + 7 * (i + 1)
            sd, ratios = make_lora(spec, sd15_lora_targets(lora_parts), s, rank, rel)
            jobs.append((name, sd, lora_meta(name, "networks.lora", rank, "sd_v1", s), ratios))
        s = seed * 31 + 7 * 4
        sd, ratios = make_loha(spec, sd15_lora_targets(ATTN1 + ATTN2, which={0, 6, 15}, with_proj=False), s, 4, 0.08)
        meta = lora_meta("lohaD", "lycoris.kohya", 4, "sd_v1", s, alpha=4.0)
        meta["ss_network_args"] = json.dumps({"algo": "loha"})
        jobs.append(("lohaD", sd, meta, ratios))
        return jobs
    s = seed * 37 + 11
    sd, ratios = make_lora(spec, sdxl_unet_targets(spec, ATTN1 + ATTN2 + FF, proj=True), s, 4, 0.07)
    jobs.append(("xl_styleA", sd, lora_meta("xl_styleA", "networks.lora", 4, "sdxl_base_v1-0", s), ratios))
    s = seed * 37 + 22
    sd, ratios = make_lora(spec, sdxl_unet_targets(spec, ATTN2, proj=False), s, 8, 0.08)
    te_layers = ([*range(12)], [*range(0, 32, 4), 31])
    for enc, layers in enumerate(te_layers):
        te, te_ratios = make_te_lora(spec, te_targets(spec, enc, layers), s + enc + 1, 8, 0.08)
        sd.update(te)
        ratios += te_ratios
    jobs.append(("xl_charB", sd, lora_meta("xl_charB", "networks.lora", 8, "sdxl_base_v1-0", s), ratios))
    s = seed * 37 + 33
    sd, ratios = make_lora(spec, sdxl_conv_targets(spec) + sdxl_unet_targets(spec, ATTN1, proj=False), s, 4, 0.06)
    meta = lora_meta("xl_loconC", "lycoris.kohya", 4, "sdxl_base_v1-0", s)
    meta["ss_network_args"] = json.dumps({"algo": "locon", "conv_dim": 4, "conv_alpha": 2.0})
    jobs.append(("xl_loconC", sd, meta, ratios))
    return jobs


def lora_meta(name: str, module: str, rank: int, base: str, seed: int, alpha: float | None = None) -> dict[str, str]:
    return {"ss_network_module": module, "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank / 2 if alpha is None else alpha), "ss_base_model_version": base,
            "ss_output_name": name, "loratorio.note": f"random weights, tests/webui/make_models.py seed {seed}"}


# ------------------------------------------------------------------------------------------------------------------


def mib(path: str) -> float:
    return os.path.getsize(path) / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models_dir", help="the WebUI's models folder (Stable-diffusion/ and Lora/ are written under it)")
    ap.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    ap.add_argument("--fp32", action="store_true", help="store the checkpoint in fp32 (default fp16)")
    ap.add_argument("--seed", type=int, default=1515)
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    ap.add_argument("--loras-only", action="store_true", help="write only the LoRA files")
    opt = ap.parse_args(argv)
    t_all = time.time()
    sd_dir, lora_dir = os.path.join(opt.models_dir, "Stable-diffusion"), os.path.join(opt.models_dir, "Lora")
    os.makedirs(sd_dir, exist_ok=True)
    os.makedirs(lora_dir, exist_ok=True)
    spec = sd15_spec() if opt.arch == "sd15" else sdxl_spec()
    te = "cond_stage_model." if opt.arch == "sd15" else "conditioner."
    n_unet = sum(k.startswith(UNET) for k in spec)
    print(f"make_models {opt.arch}: UNet {n_unet} keys {params(spec, UNET) / 1e6:.2f}M, "
          f"VAE {params(spec, 'first_stage_model.') / 1e6:.2f}M, text encoders {params(spec, te) / 1e6:.2f}M")
    if not opt.loras_only:
        name = "sd15-random.safetensors" if opt.arch == "sd15" else "sdxl-random.safetensors"
        ckpt = os.path.join(sd_dir, name)
        dtype = torch.float32 if opt.fp32 else torch.float16
        if os.path.exists(ckpt) and not opt.force:
            print(f"make_models: {ckpt} exists, kept (--force to rewrite)")
        else:
            t = time.time()
            arch = "stable-diffusion-v1" if opt.arch == "sd15" else "stable-diffusion-xl-v1-base"
            write_checkpoint(ckpt, spec, opt.seed, dtype, {"format": "pt", "modelspec.architecture": arch,
                                                            "loratorio.note": f"random weights, seed {opt.seed}"})
            print(f"make_models: wrote {ckpt}: {len(spec)} keys, {mib(ckpt):.1f} MiB, {str(dtype)[6:]}, "
                  f"{time.time() - t:.1f}s")
    for name, sd, meta, ratios in lora_jobs(opt.arch, spec, opt.seed):
        path = os.path.join(lora_dir, name + ".safetensors")
        if os.path.exists(path) and not opt.force:
            print(f"make_models: {path} exists, kept")
            continue
        write_safetensors(path, {k: (tuple(v.shape), v.dtype, lambda v=v: v) for k, v in sd.items()}, meta)
        print(f"make_models: wrote {path}: {len(ratios)} modules, |dW|/|W| {min(ratios):.3f}-{max(ratios):.3f}, "
              f"{mib(path):.2f} MiB")
    print(f"make_models: done in {time.time() - t_all:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
