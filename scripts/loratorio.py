"""LoRAtorio AlwaysOn script: UI, arguments and delegation to the host glue in `loratorio.hosts`."""

import logging
import sys

import gradio as gr
from modules import errors, script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

from loratorio import maps, ui
from loratorio.core import settings_from_args
from loratorio.hosts import a1111, forge, xyz
from loratorio.hosts.detect import A1111, FORGE, REFORGE, detect_host

log = logging.getLogger("loratorio")
HOST = detect_host()


class LoratorioScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return "LoRAtorio"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        components = ui.build(gr, InputAccordion, is_img2img)
        self.infotext_fields = ui.infotext_fields(components)
        self.paste_field_names = [key for _, key in self.infotext_fields if isinstance(key, str)]
        return components

    def process(self, p, *args):
        self._remove()
        self.maps, self.pending_maps, self.settings, self.error = [], None, None, None
        self.chunks, self.ooms, self.chunks_logged = 1, 0, False
        xyz.clear_infotext(p.extra_generation_params)
        try:
            self.settings = xyz.with_overrides(settings_from_args(args), p)
        except ValueError as exc:
            # The host swallows hook exceptions; the error is raised again from the first sampling call instead.
            self.error = str(exc)
            self._warn(p, f"LoRAtorio: {exc}")
            raise
        if self.settings.enabled:
            p.extra_generation_params.update(self.settings.to_infotext())

    def process_before_every_sampling(self, p, *args, **kwargs):
        self._remove()
        if getattr(self, "error", None):
            if HOST in (FORGE, REFORGE):
                self.undo = forge.refuse(p, self.error)
            elif HOST == A1111:
                self.undo = a1111.refuse(p.sampler.model_wrap_cfg, self.error)
            return
        if not getattr(self, "settings", None) or not self.settings.enabled:
            return
        if HOST not in (A1111, FORGE, REFORGE):
            return self._warn(p, f"LoRAtorio does not support this WebUI ({HOST}); sampled normally")
        try:
            self.state = self._install(p, lambda msg: self._warn(p, msg))
        except Exception as exc:  # host boundary: report, undo, and sample normally
            errors.report("LoRAtorio could not start; sampling normally", exc_info=True)
            self._remove()
            self._warn(p, f"LoRAtorio could not start ({exc}); sampled normally")

    def _install(self, p, warn):
        networks = sys.modules.get("networks")
        if HOST == A1111:
            from modules import devices
            from modules.sd_samplers_cfg_denoiser import CFGDenoiser

            return a1111.install(p, self.settings, sd_model=shared.sd_model, networks_module=networks,
                                 base_denoiser_cls=CFGDenoiser, warn=warn, device=devices.device)
        backend = forge.forge_backend() if HOST == FORGE else forge.reforge_backend(p.sd_model, networks)
        return forge.install(p, self.settings, backend=backend, networks_module=networks, warn=warn)

    def before_hr(self, p, *args):
        self._remove()

    def postprocess_batch(self, p, *args, **kwargs):
        self._remove()
        if getattr(self, "chunks", 1) > 1:  # before the host writes this batch's infotext
            p.extra_generation_params["LoRAtorio chunks"] = self.chunks
            if not self.chunks_logged:
                self.chunks_logged = True
                log.info("LoRAtorio: the batched call was split into %d chunks to fit device memory "
                         "(%d out-of-memory retries)", self.chunks, self.ooms)
        if self.pending_maps is not None:
            self.maps.extend(self.pending_maps)
            self.pending_maps = None

    def postprocess(self, p, processed, *args):
        self._remove()
        for caption, image in self.maps:
            processed.images.append(image)
            processed.infotexts.append(caption)
        self.maps = []

    def _remove(self):
        undo, self.undo = getattr(self, "undo", None), None
        if undo is not None:
            undo()
        state, self.state = getattr(self, "state", None), None
        if state is None:
            return
        (a1111 if HOST == A1111 else forge).remove(state)
        chunker = state.composer.chunker
        self.chunks = max(getattr(self, "chunks", 1), chunker.most_chunks)
        self.ooms = getattr(self, "ooms", 0) + chunker.ooms
        if state.map_steps:
            names = [n.mentioned_name or n.name for n in state.networks]
            self.pending_maps = maps.weight_map_images(state.map_sum / state.map_steps, names)

    def _warn(self, p, message):
        log.warning(message)
        p.extra_generation_params["LoRAtorio warning"] = message


script_callbacks.on_before_ui(lambda: xyz.register_with(scripts.scripts_data))
if HOST == A1111:  # Forge and reForge never fire on_cfg_denoised; their glue lives on the UnetPatcher clone
    script_callbacks.on_cfg_denoiser(a1111.on_cfg_denoiser)
    script_callbacks.on_cfg_denoised(a1111.on_cfg_denoised)
