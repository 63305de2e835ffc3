"""Foreign column names: the one table of the names AUTOMATIC1111 (its API and infotext), ComfyUI
and diffusers scripts give a manifest column, each with what to write in sdbatch instead.

A manifest column with one of these names would otherwise ride along as a label while every image
renders with the job's defaults, so manifest validation refuses it (with or without ``--strict``),
naming the sdbatch column or spec option and the fix (``manifest.rules.check_passthrough_columns``).
Matching ignores case, spaces and dashes (``CFG scale``, ``cfg-scale``, ``cfg_scale``). Names that
are also sdbatch's own (``prompt``, ``steps``, ``seed``, ``scheduler``) are not listed: they are
the per-row columns; nor are names common as labels (``size``, ``styles``). A1111 sampler names
are accepted as values of ``scheduler`` (``data.samplers.sampler_name``).

A leaf module: the standard library only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Foreign:
    """What sdbatch calls a foreign column: a per-row ``column`` to rename it to, or, where sdbatch
    has no per-row column for it, ``instead`` — the spec option or practice that does the job."""

    column: str | None = None
    instead: str | None = None
    #: where the name has two meanings (A1111's ``denoising_strength``): the other column, and when
    or_column: tuple[str, str] | None = None

    def fix(self, name: str) -> str:
        if self.column is not None:
            other = f", or to {self.or_column[0]!r} {self.or_column[1]}" if self.or_column else ""
            return f"rename column {name!r} to {self.column!r}{other}"
        return f"drop column {name!r} (or rename it to a label such as 'label_{_key(name)}'); {self.instead}"


def _rename(column: str) -> Foreign:
    return Foreign(column=column)


_GUIDANCE, _STEPS, _NEGATIVE = _rename("guidance_scale"), _rename("steps"), _rename("negative_prompt")
_SAMPLER = Foreign(column="scheduler")  # A1111 sampler names are accepted as its values
_HIRES_SCALE = _rename("hires_scale")
_BATCH = Foreign(instead="images per batch are a job setting: resources.batch_size (--set resources.batch_size=N); "
                         "for several images of one prompt write one row per seed")


#: Foreign name (lower case, ``_`` for spaces and dashes) → what sdbatch calls it.
FOREIGN_COLUMNS: dict[str, Foreign] = {
    # AUTOMATIC1111 API / infotext, ComfyUI's KSampler, diffusers' call arguments
    "cfg_scale": _GUIDANCE, "cfg": _GUIDANCE, "guidance": _GUIDANCE, "true_cfg_scale": _GUIDANCE,
    "sampler_name": _SAMPLER, "sampler": _SAMPLER, "sampler_index": _SAMPLER,
    "denoising_strength": Foreign(column="strength", or_column=("hires_strength", "for a hires-fix pass (as A1111's "
                                                                "txt2img with enable_hr reads it)")),
    "denoise": _rename("strength"),
    "negative": _NEGATIVE, "negative_prompts": _NEGATIVE, "neg_prompt": _NEGATIVE, "prompt_negative": _NEGATIVE,
    "num_inference_steps": _STEPS, "sampling_steps": _STEPS, "num_steps": _STEPS,
    "noise_seed": _rename("seed"), "clip_stop_at_last_layers": _rename("clip_skip"),
    "init_images": _rename("init_image"), "image": _rename("init_image"), "init_image_path": _rename("init_image"),
    "refiner_switch_at": _rename("refiner_switch"),
    "batch_size": _BATCH, "n_iter": _BATCH, "num_images_per_prompt": _BATCH, "batch_count": _BATCH,
    "enable_hr": Foreign(instead="a row has a hires-fix pass when hires_scale is set (e.g. 2), "
                                 "with hires_strength and hires_steps"),
    "hr_scale": _HIRES_SCALE, "hires_upscale": _HIRES_SCALE, "hr_upscale": _HIRES_SCALE,
    "hr_second_pass_steps": _rename("hires_steps"), "hires_denoising_strength": _rename("hires_strength"),
    "hr_upscaler": Foreign(instead="sdbatch's hires-fix pass upscales the latents (A1111's 'Latent' upscaler); "
                                   "set hires_scale"),
    "hr_resize_x": Foreign(instead="the hires-fix size is width × hires_scale: set hires_scale"),
    "hr_resize_y": Foreign(instead="the hires-fix size is height × hires_scale: set hires_scale"),
    "sd_vae": Foreign(instead="a VAE is one per job, not per row: set model.vae in the spec (or --vae FOLDER)"),
    "sd_model_checkpoint": Foreign(instead="the model is one per job: model.name in the spec (--model PATH)"),
    "refiner_checkpoint": Foreign(instead="the refiner is one per job: model.refiner in the spec (--refiner PATH)"),
    "subseed": Foreign(instead="sdbatch has no variation seeds: vary the seed column"),
    "subseed_strength": Foreign(instead="sdbatch has no variation seeds: vary the seed column"),
    "restore_faces": Foreign(instead="sdbatch does not restore faces; post-process the outputs"),
    "tiling": Foreign(instead="sdbatch does not render tiling images"),
    "eta": Foreign(instead="sdbatch runs each sampler with its default eta"),
    "guidance_rescale": Foreign(instead="sdbatch runs each model without guidance rescale"),
    "mask": _rename("mask_image"), "mask_path": _rename("mask_image"), "inpaint_mask": _rename("mask_image"),
    "inpainting_mask_invert": Foreign(instead="mask_image is white where it repaints: invert the mask file"),
    "mask_blur": Foreign(instead="sdbatch reads the mask as it is: blur the mask file"),
    "override_settings": Foreign(instead="settings are the job spec's (sdbatch spec lists them)"),
    "lora": _rename("loras"), "lora_scale": _rename("loras"),
    # diffusers' set_ip_adapter_scale, ComfyUI's IPAdapter weight; the reference image under its other names
    "ip_adapter_weight": _rename("ip_adapter_scale"), "ipadapter_weight": _rename("ip_adapter_scale"),
    "ipadapter_image": _rename("ip_adapter_image"), "reference_image": _rename("ip_adapter_image"),
    "ip_adapter_image_embeds": Foreign(instead="sdbatch encodes each row's ip_adapter_image with the spec's "
                                               "ip_adapter.image_encoder: give the image"),
}


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def foreign(name: str) -> Foreign | None:
    """What sdbatch calls a manifest column named the A1111 / ComfyUI / diffusers way, if it is one."""
    return FOREIGN_COLUMNS.get(_key(name))
