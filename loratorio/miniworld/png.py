"""PNG writing with the standard library only (zlib + struct), so the demo needs no imaging package."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: Tensor) -> bytes:
    """PNG bytes of an RGB image (3, H, W) with values in [0, 1]."""
    rgb = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].numpy().tobytes() for row in range(h))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(
        b"IEND", b"")


def write_png(path: str | Path, image: Tensor) -> None:
    """Write an RGB image (3, H, W) in [0, 1] as a PNG file."""
    Path(path).write_bytes(encode_png(image))


def grid(rows: Sequence[Sequence[Tensor]], scale: int = 4, pad: int = 2, fill: float = 1.0) -> Tensor:
    """Tile equally sized (3, H, W) images row by row, upscaled by `scale` (nearest), with `pad` px gaps."""
    h, w = rows[0][0].shape[-2:]
    cols = max(len(r) for r in rows)
    hh, ww = h * scale, w * scale
    out = torch.full((3, len(rows) * (hh + pad) + pad, cols * (ww + pad) + pad), fill)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            big = img.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
            y, x = pad + i * (hh + pad), pad + j * (ww + pad)
            out[:, y:y + hh, x:x + ww] = big.expand(3, hh, ww)
    return out


def heatmap(weights: Tensor) -> Tensor:
    """A (H, W) map in [0, 1] as an RGB image: dark blue (0) through to yellow (1)."""
    w = weights.clamp(0, 1)[None]
    low, high = torch.tensor([0.1, 0.1, 0.35]).view(3, 1, 1), torch.tensor([1.0, 0.9, 0.2]).view(3, 1, 1)
    return low * (1 - w) + high * w


# A 3×5 bitmap font (rows as 3-bit strings) for the few capitals the demo's labels need: no font files.
_GLYPHS = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "K": "101101110101101", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "010101101101010", "P": "110101110100100", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "W": "101101111111101",
    "Y": "101101010010010", "-": "000000111000000", " ": "000000000000000", "=": "000111000111000",
}


def label(text: str, width: int, scale: int = 2, height: int = 14) -> Tensor:
    """A white (3, height, width) strip with `text` in dark capitals, centred; unknown characters become spaces."""
    out = torch.ones(3, height, width)
    glyphs = [_GLYPHS.get(ch, _GLYPHS[" "]) for ch in text.upper()]
    step = 4 * scale
    x0 = max(0, (width - len(glyphs) * step + scale) // 2)
    y0 = (height - 5 * scale) // 2
    for k, bits in enumerate(glyphs):
        for i, bit in enumerate(bits):
            if bit == "1":
                y, x = y0 + (i // 3) * scale, x0 + k * step + (i % 3) * scale
                out[:, y:y + scale, x:x + scale] = 0.1
    return out[:, :, :width]
