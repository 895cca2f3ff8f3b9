"""Which WebUI is running, by probing for features rather than reading version strings."""

from __future__ import annotations

import importlib.util

A1111, FORGE, REFORGE, UNKNOWN = "a1111", "forge", "reforge", "unknown"


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect_host() -> str:
    """forge: lllyasviel's 2.x `backend` package; reforge: `ldm_patched` with `modules_forge`; a1111: neither."""
    if _has("backend") and _has("backend.patcher.unet"):
        return FORGE
    if _has("ldm_patched") and _has("modules_forge"):
        return REFORGE
    if _has("modules.sd_samplers_cfg_denoiser"):
        return A1111
    return UNKNOWN
