"""WebUI install hook. LoRAtorio needs only what the WebUI already ships (torch, safetensors, numpy, gradio), so it
installs nothing: an offline start must never fail here."""

import logging

logging.getLogger("loratorio").debug("LoRAtorio: no dependencies to install")
