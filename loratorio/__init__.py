"""sd-webui-loratorio: training-free LoRA composition (LoRAtorio, arXiv 2508.11624) for the Stable Diffusion WebUIs."""

__version__ = "0.1.0"
