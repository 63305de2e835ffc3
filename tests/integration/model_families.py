"""Tiny random-weight pipelines of every supported family, built from configs (no downloads)
and saved as diffusers folders with safetensors, the way diffusers' own tests build theirs;
and a tiny non-zero LoRA for ``builtin:shapes``. Test-only."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sdbatch.models.builtin import resolve_builtin

#: folder name -> native size the configs below give (denoiser sample_size × VAE scale 2; FLUX's
#: pipeline default_sample_size 128 × its one-block VAE's scale 1)
NATIVE = {"sd15": 72, "sd2v": 80, "sdxl": 96, "sd3": 64, "sd35_large": 64, "sd35_medium": 64, "flux-dev": 128,
          "flux-schnell": 128, "chroma": 128}


def _clip_tokenizer(folder: Path) -> None:
    shutil.copytree(resolve_builtin("builtin:tiny") / "tokenizer", folder)


def _vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=32)


def _clip(projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, pad_token_id=1, vocab_size=1000, projection_dim=32, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _sd_unet(sample_size: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                attention_head_dim=(2, 4), **extra)


def _save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    for tok in ("tokenizer", "tokenizer_2"):  # the project's own CLIP tokenizer files, as shipped
        if (folder / tok).exists() and "CLIP" in (folder / tok / "tokenizer_config.json").read_text():
            shutil.rmtree(folder / tok)
            _clip_tokenizer(folder / tok)
    return folder


def build_sd(folder: Path, *, v_prediction: bool = False) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    unet = _sd_unet(NATIVE[folder.name] // 2, cross_attention_dim=32)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction" if v_prediction else "epsilon")
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(), tokenizer=CLIPTokenizer.from_pretrained(resolve_builtin("builtin:tiny") / "tokenizer"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _save(pipe, folder)


def build_sdxl(folder: Path, *, width_2: int = 32) -> Path:
    """``width_2``: the second text encoder's width (OpenCLIP bigG's 1280 beside CLIP-L's 768 in
    the real one; diffusers tells a whole-pipeline checkpoint's two encoders apart by it)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    unet = _sd_unet(NATIVE["sdxl"] // 2, cross_attention_dim=32 + width_2, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                    projection_class_embeddings_input_dim=80)
    tok = CLIPTokenizer.from_pretrained(resolve_builtin("builtin:tiny") / "tokenizer")
    vae = _vae()
    vae.register_to_config(force_upcast=True)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_clip(), tokenizer=tok, text_encoder_2=_clip(projection=True, hidden=width_2),
                                     tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(
                                         beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         timestep_spacing="leading", steps_offset=1))
    return _save(pipe, folder)


def _t5_tokenizer():
    """A T5 (Unigram, sentencepiece-style) tokenizer over a few words and the letters, built in
    code: no tokenizer files to download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(w, -2.0) for w in "a red blue green circle square on the of".split()]
    vocab += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=77)


def build_sd3(folder: Path, *, t5: bool = False, **layout) -> Path:
    """SD3 without its T5 encoder (as the 'no T5' checkpoints), or with a tiny one (``t5``);
    ``layout``: more transformer config (SD3.5's qk_norm, dual_attention_layers; num_layers=2 for
    a ControlNet: the one block of 1 is the last, which takes no ControlNet residual)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    # the T5 embeddings are the joint attention's width; the two CLIPs' (32 + 32) are padded to it
    joint = 64 if t5 else 32
    transformer = SD3Transformer2DModel(sample_size=NATIVE[folder.name] // 2, patch_size=1, in_channels=4,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=joint, pooled_projection_dim=64, out_channels=4,
                                        **{"num_layers": 1, **layout})
    tok = CLIPTokenizer.from_pretrained(resolve_builtin("builtin:tiny") / "tokenizer")
    vae = _vae()
    vae.register_to_config(shift_factor=0.0625, scaling_factor=1.5)
    tok_3 = _t5_tokenizer() if t5 else None
    encoder_3 = _t5_encoder(tok_3, joint) if t5 else None
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=_clip(projection=True), tokenizer=tok,
                                    text_encoder_2=_clip(projection=True), tokenizer_2=tok,
                                    text_encoder_3=encoder_3, tokenizer_3=tok_3)
    _save(pipe, folder)  # without T5: loaded with text_encoder_3=None
    return folder


def _t5_encoder(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
                                   pad_token_id=0, eos_token_id=1))


def _flux_vae():
    """FLUX's VAE shape (16 latent channels in the real one; 1 here) with one block: scale
    factor 1, so the native size is the pipeline's default_sample_size, 128."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def flux_transformer(*, guidance: bool):
    """diffusers' test config of FluxTransformer2DModel ([dev] embeds its guidance)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8], guidance_embeds=guidance)


def build_flux(folder: Path, *, dev: bool = True) -> Path:
    """A tiny FLUX.1 [dev] (guidance embedded, dynamic shift) or [schnell] (no guidance, fixed
    shift 1), as their scheduler configs are."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    transformer = flux_transformer(guidance=dev)
    tok_2 = _t5_tokenizer()
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=256, max_image_seq_len=4096) if dev
                 else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
    pipe = FluxPipeline(scheduler=scheduler, vae=_flux_vae(), text_encoder=_clip(),
                        tokenizer=CLIPTokenizer.from_pretrained(resolve_builtin("builtin:tiny") / "tokenizer"),
                        text_encoder_2=_t5_encoder(tok_2, 32), tokenizer_2=tok_2, transformer=transformer)
    return _save(pipe, folder)


def build_chroma(folder: Path) -> Path:
    """A tiny Chroma (diffusers' test config): FLUX.1's shape, a T5 alone, real CFG."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32, approximator_layers=1,
                                           approximator_num_channels=16)
    tok = _t5_tokenizer()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True), vae=_flux_vae(),
                          text_encoder=_t5_encoder(tok, 32), tokenizer=tok, transformer=transformer)
    return _save(pipe, folder)


def build_all(root: Path) -> dict[str, Path]:
    return {
        "sd15": build_sd(root / "sd15"),
        "sd2v": build_sd(root / "sd2v", v_prediction=True),
        "sdxl": build_sdxl(root / "sdxl"),
        "sd3": build_sd3(root / "sd3"),
    }


def build_shapes_lora(path: Path, *, seed: int, rank: int = 4) -> Path:
    """A PEFT LoRA on builtin:shapes' UNet attention projections with non-zero weights (PEFT
    initialises lora_B to zero, which would be a no-op), saved with save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(resolve_builtin("builtin:shapes"), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              weight_name=path.name, safe_serialization=True)
    return path


def build_sdxl_refiner(folder: Path, base: Path) -> Path:
    """A tiny SDXL refiner (``StableDiffusionXLImg2ImgPipeline``: no first text encoder, an
    aesthetic-score UNet conditioned on text_encoder_2 alone), holding the base's text_encoder_2
    and VAE as the real refiner folder does."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    torch.manual_seed(1)
    base_pipe = StableDiffusionXLPipeline.from_pretrained(base)
    # time ids: original size (2) + crop (2) + aesthetic score (1), 8 dims each, + the pooled text embedding (32)
    unet = _sd_unet(NATIVE["sdxl"] // 2, cross_attention_dim=32, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                    projection_class_embeddings_input_dim=5 * 8 + 32)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base_pipe.vae, text_encoder=None, tokenizer=None, text_encoder_2=base_pipe.text_encoder_2,
        tokenizer_2=base_pipe.tokenizer_2, unet=unet, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        scheduler=EulerDiscreteScheduler.from_config(base_pipe.scheduler.config))
    return _save(pipe, folder)


def to_kohya(peft_lora: Path, path: Path, rank: int = 4, component: str = "unet") -> Path:
    """The same adapter in kohya-ss naming (``lora_unet_<module path with _>.lora_down/up.weight``
    and ``.alpha``), as sd-scripts writes SD 1.x LoRAs (and trainers of Z-Image / Qwen-Image
    theirs, ``component="transformer"``); alpha = rank keeps the scale at 1."""
    from safetensors.torch import load_file, save_file

    kohya = {}
    for key, tensor in load_file(peft_lora).items():
        module, _, kind = key.removeprefix(f"{component}.").rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(kohya, path)
    return path


#: the FLUX transformer modules the test LoRAs adapt, diffusers name -> kohya (sd-scripts) name
FLUX_LORA_MODULES = {"transformer_blocks.0.attn.to_out.0": "lora_unet_double_blocks_0_img_attn_proj",
                     "single_transformer_blocks.0.proj_out": "lora_unet_single_blocks_0_linear2"}


def build_transformer_lora(model: Path, path: Path, *, seed: int, target_modules: list[str], rank: int = 4) -> Path:
    """A PEFT LoRA on ``target_modules`` of ``model``'s transformer (FLUX.1, Chroma, Z-Image,
    Qwen-Image, FLUX.2: the classes its model_index.json names) with non-zero weights (PEFT
    starts lora_B at zero, a no-op), saved with the model's pipeline class's save_lora_weights
    (diffusers/PEFT key layout)."""
    import json

    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    index = json.loads((model / "model_index.json").read_text())
    transformer = getattr(diffusers, index["transformer"][1]).from_pretrained(model / "transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    getattr(diffusers, index["_class_name"]).save_lora_weights(
        path.parent, transformer_lora_layers=get_peft_model_state_dict(transformer), weight_name=path.name,
        safe_serialization=True)
    return path


def flux_to_kohya(peft_lora: Path, path: Path, rank: int = 4) -> Path:
    """The same FLUX adapter in kohya-ss naming (``lora_unet_double_blocks_0_img_attn_proj``
    ``.lora_down/.lora_up.weight`` and ``.alpha``, Black Forest Labs' module names), as
    sd-scripts writes FLUX LoRAs; alpha = rank keeps the scale at 1."""
    from safetensors.torch import load_file, save_file

    kohya = {}
    for key, tensor in load_file(peft_lora).items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        name = FLUX_LORA_MODULES[module]
        kohya[f"{name}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = tensor
        kohya[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(kohya, path)
    return path


def sd3_transformer_to_original(transformer_folder: Path, path: Path) -> Path:
    """A diffusers SD3 transformer written as a single-file checkpoint in Stability AI's original
    key layout (``model.diffusion_model.joint_blocks.N.x_block.attn.qkv`` …), the inverse of
    diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` for a model without dual
    attention or qk-norm (SD3 Medium's layout)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(transformer_folder / "diffusion_pytorch_model.safetensors")
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))

    def swap_halves(t):  # the original's (shift, scale) is diffusers' (scale, shift): its own inverse
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)

    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    renames = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
               "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
               "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
    for i in range(layers):
        j, d, last = f"joint_blocks.{i}", f"transformer_blocks.{i}", i == layers - 1
        renames |= {f"{j}.x_block.attn.proj": f"{d}.attn.to_out.0", f"{j}.x_block.adaLN_modulation.1": f"{d}.norm1.linear",
                    f"{j}.x_block.mlp.fc1": f"{d}.ff.net.0.proj", f"{j}.x_block.mlp.fc2": f"{d}.ff.net.2"}
        if not last:
            renames |= {f"{j}.context_block.attn.proj": f"{d}.attn.to_add_out",
                        f"{j}.context_block.adaLN_modulation.1": f"{d}.norm1_context.linear",
                        f"{j}.context_block.mlp.fc1": f"{d}.ff_context.net.0.proj",
                        f"{j}.context_block.mlp.fc2": f"{d}.ff_context.net.2"}
        for kind in ("weight", "bias"):
            out[f"{j}.x_block.attn.qkv.{kind}"] = torch.cat([sd[f"{d}.attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{j}.context_block.attn.qkv.{kind}"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.{kind}"] for x in "qkv"])
            if last:
                out[f"{j}.context_block.adaLN_modulation.1.{kind}"] = swap_halves(sd[f"{d}.norm1_context.linear.{kind}"])
    for kind in ("weight", "bias"):
        out |= {f"{original}.{kind}": sd[f"{ours}.{kind}"] for original, ours in renames.items()}
        out[f"final_layer.adaLN_modulation.1.{kind}"] = swap_halves(sd[f"norm_out.linear.{kind}"])
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}, path)
    return path


def build_controlnet(model: Path, path: Path, *, seed: int, **config) -> Path:
    """A ControlNet for the UNet of the diffusers folder ``model`` (``ControlNetModel.from_unet``,
    its control-image encoder downsampling by the model's VAE factor), with random non-zero
    output convolutions — a trained ControlNet's are no longer the zeros it starts from, and
    zeros would leave the image unchanged. ``config``: keys changed to make one that does not fit."""
    import json

    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae_blocks = len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"])
    embedding = tuple(8 * 2**i for i in range(vae_blocks))  # one stride-2 convolution per VAE downsampling
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
    if config:
        controlnet = ControlNetModel.from_config({**controlnet.config, **config})
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.5)
            conv.bias.normal_(0, 0.5)
    controlnet.save_pretrained(path, safe_serialization=True)
    return path


def build_transformer_controlnet(model: Path, path: Path, *, seed: int, **config) -> Path:
    """A one-block ControlNet for the transformer of the FLUX.1 or SD3 diffusers folder ``model``
    (its config's shared keys), with random non-zero weights where diffusers starts it at zero
    (the control-latent embedding, the residual projections), as a trained one is. ``config``:
    keys changed to make one that does not fit."""
    import inspect
    import json

    import diffusers

    torch.manual_seed(seed)
    denoiser = json.loads((model / "transformer" / "config.json").read_text())
    model_class = {"FluxTransformer2DModel": diffusers.FluxControlNetModel,
                   "SD3Transformer2DModel": diffusers.SD3ControlNetModel}[denoiser["_class_name"]]
    shared = {k: v for k, v in denoiser.items() if k in inspect.signature(model_class.__init__).parameters}
    controlnet = model_class(**{**shared, "num_layers": 1, **config})
    with torch.no_grad():
        for weight in controlnet.parameters():
            if not weight.any():
                weight.normal_(0, 0.5)
    controlnet.save_pretrained(path, safe_serialization=True)
    return path


def build_ip_adapter(model: Path, folder: Path, *, seed: int, cross_attention_dim: int | None = None) -> tuple[Path, Path]:
    """An IP-Adapter for the UNet of the diffusers folder ``model`` and its image encoder, as
    diffusers' own tests make one (``create_ip_adapter_state_dict``): per cross-attention layer,
    in ``attn_processors`` order, random ``to_k_ip`` / ``to_v_ip`` under keys 1, 3, 5, …, and an
    ``ImageProjection`` of four tokens from a tiny ``CLIPVisionModelWithProjection``. Saved as one
    safetensors file (``ip-adapter.safetensors``) and an image-encoder folder under ``folder``;
    ``cross_attention_dim``: another width, to make one that does not fit."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    width = cross_attention_dim or unet.config.cross_attention_dim
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        image_size=32, patch_size=8))
    encoder.save_pretrained(folder / "image_encoder", safe_serialization=True)
    tensors: dict[str, torch.Tensor] = {}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):  # a cross-attention layer: the adapter's keys and values
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            for part in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key_id}.{part}.weight"] = torch.nn.Linear(width, hidden, bias=False).weight.detach()
            key_id += 2
    projection = ImageProjection(cross_attention_dim=width, image_embed_dim=32, num_image_text_embeds=4).state_dict()
    tensors.update({"image_proj.proj.weight": projection["image_embeds.weight"],
                    "image_proj.proj.bias": projection["image_embeds.bias"],
                    "image_proj.norm.weight": projection["norm.weight"], "image_proj.norm.bias": projection["norm.bias"]})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "ip-adapter.safetensors")
    return folder / "ip-adapter.safetensors", folder / "image_encoder"


#: a resnet's tensors, diffusers name -> original (LDM) name
_LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
#: a VAE's resnets and mid-block attention, diffusers name -> original
_LDM_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_LDM_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def _to_original(tensors: dict, exact: dict[str, str], blocks: list[tuple[str, str, dict[str, str]]]) -> dict:
    """``tensors`` renamed to an original layout: a key in ``exact`` (diffusers -> original) as
    it says; one under a block's diffusers prefix (``blocks``: diffusers prefix, original prefix,
    renames of the first name after it) under the original prefix. A key neither names is a
    mistake in the caller's tables."""
    out = {}
    for key, tensor in tensors.items():
        if key in exact:
            out[exact[key]] = tensor
            continue
        ours, original, names = next(b for b in blocks if key.startswith(b[0]))
        head, _, tail = key.removeprefix(ours).partition(".")
        out[original + ".".join(filter(None, [names.get(head, head), tail]))] = tensor
    return out


def _unet_to_ldm(tensors: dict, config: dict) -> dict:
    """A diffusers UNet2DConditionModel's tensors in the original LDM layout
    (``input_blocks.N.0`` resnets, ``.1`` attentions, ``middle_block``, ``output_blocks``), for any
    number of blocks and layers: the inverse of diffusers' ``convert_ldm_unet_checkpoint``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    exact = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":  # SDXL's size/crop embedding
        exact |= DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    per_block = config["layers_per_block"] + 1  # LDM counts a block's downsampler / upsampler as a layer
    blocks = [("mid_block.resnets.0.", "middle_block.0.", _LDM_RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
              ("mid_block.resnets.1.", "middle_block.2.", _LDM_RESNET)]
    for b, up_type in enumerate(config["up_block_types"]):
        for j in range(per_block - 1):
            layer = b * per_block + j + 1
            blocks += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{layer}.0.", _LDM_RESNET),
                       (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{layer}.1.", {})]
        blocks.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * per_block}.0.op.", {}))
        for j in range(per_block):
            blocks += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{b * per_block + j}.0.", _LDM_RESNET),
                       (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{b * per_block + j}.1.", {})]
        upsampler = 2 if "CrossAttn" in up_type else 1  # after the last layer's attention, where it has one
        blocks.append((f"up_blocks.{b}.upsamplers.0.conv.", f"output_blocks.{(b + 1) * per_block - 1}.{upsampler}.conv.", {}))
    return _to_original(tensors, exact, blocks)


def _vae_to_ldm(tensors: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL's tensors in the original LDM layout (``encoder.down.N.block``,
    ``decoder.up.N.block`` numbered from the bottom, ``mid.attn_1`` as 1×1 convolutions): the
    inverse of diffusers' ``convert_ldm_vae_checkpoint``."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    count = len(config["block_out_channels"])
    blocks = []
    for i in range(count):
        for j in range(config["layers_per_block"] + 1):
            blocks += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _LDM_VAE_RESNET),
                       (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{count - 1 - i}.block.{j}.", _LDM_VAE_RESNET)]
        blocks += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}),
                   (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{count - 1 - i}.upsample.", {})]
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", _LDM_VAE_RESNET) for j in range(2)]
        blocks.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _LDM_VAE_ATTENTION))
    out = _to_original(tensors, DIFFUSERS_TO_LDM_MAPPING["vae"], blocks)
    # diffusers' to_out.0 (a ModuleList's first) is one module, proj_out, there; a 1×1 convolution's weight
    return {k.replace("proj_out.0.", "proj_out."): v[..., None, None] if ".attn_1." in k and v.ndim == 2 else v
            for k, v in out.items()}


def _clip_to_original(tensors: dict) -> dict:
    """An OpenAI CLIP text encoder as the original checkpoints hold it: transformers' own names
    under ``text_model.`` (which transformers ≥ 5.6 leaves out of a CLIPTextModel's)."""
    return {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in tensors.items()}


def _open_clip_to_original(tensors: dict) -> dict:
    """A CLIPTextModelWithProjection as OpenCLIP names it (SDXL's second encoder:
    ``transformer.resblocks.N.attn.in_proj_weight`` with q, k, v stacked, ``text_projection``
    transposed): the inverse of diffusers' ``convert_open_clip_checkpoint``."""
    import re

    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    exact = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    parts = {"text_model.encoder.layers.": "transformer.resblocks.", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             ".fc1.": ".c_fc.", ".fc2.": ".c_proj.", ".self_attn.": ".attn."}

    def renamed(key: str) -> str:
        for ours, original in parts.items():
            key = key.replace(ours, original)
        return key

    out = {exact[k]: (v.T.contiguous() if k == "text_projection.weight" else v) for k, v in tensors.items() if k in exact}
    out |= {renamed(k): v for k, v in tensors.items() if k not in exact and not re.search(r"\.[qkv]_proj\.", k)}
    for key in (k for k in tensors if ".q_proj." in k):
        stacked = torch.cat([tensors[key.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"])
        out[renamed(key.replace(".q_proj.", ".in_proj_"))] = stacked  # self_attn.q_proj.weight: attn.in_proj_weight
    return out


def sd_pipeline_to_original(folder: Path, path: Path) -> Path:
    """A diffusers SD 1.x or SDXL folder written as ONE whole-pipeline single-file checkpoint in
    the original key layout, as AUTOMATIC1111 / ComfyUI / Civitai keep them:
    ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and the text encoders as
    ``cond_stage_model.transformer.*`` (SD 1.x) or ``conditioner.embedders.0.transformer.*`` and
    ``conditioner.embedders.1.model.*`` (SDXL's CLIP-L and OpenCLIP bigG)."""
    import json

    from safetensors.torch import load_file, save_file

    def part(name: str, file: str = "diffusion_pytorch_model.safetensors") -> tuple[dict, dict]:
        return load_file(folder / name / file), json.loads((folder / name / "config.json").read_text())

    out = {f"model.diffusion_model.{k}": v for k, v in _unet_to_ldm(*part("unet")).items()}
    out |= {f"first_stage_model.{k}": v for k, v in _vae_to_ldm(*part("vae")).items()}
    clip = _clip_to_original(part("text_encoder", "model.safetensors")[0])
    if (folder / "text_encoder_2").exists():
        out |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()}
        open_clip = _open_clip_to_original(part("text_encoder_2", "model.safetensors")[0])
        out |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip.items()}
    else:
        out |= {f"cond_stage_model.transformer.{k}": v for k, v in clip.items()}
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return path


def flux_transformer_to_original(transformer_folder: Path, path: Path) -> Path:
    """A diffusers FLUX.1 transformer written as a single-file checkpoint in Black Forest Labs'
    key layout (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1`` with q, k, v and the
    MLP stacked …): the inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``."""
    from safetensors.torch import load_file, save_file

    sd = load_file(transformer_folder / "diffusion_pytorch_model.safetensors")

    def count(prefix: str) -> int:
        return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix))

    def swap_halves(t):  # BFL's (shift, scale) is diffusers' (scale, shift): its own inverse
        first, second = t.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)

    renames = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
               "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
               "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
               "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
               "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
               "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
               "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
    norms = {}
    for i in range(count("transformer_blocks.")):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        renames |= {f"{o}.img_mod.lin": f"{d}.norm1.linear", f"{o}.txt_mod.lin": f"{d}.norm1_context.linear",
                    f"{o}.img_mlp.0": f"{d}.ff.net.0.proj", f"{o}.img_mlp.2": f"{d}.ff.net.2",
                    f"{o}.txt_mlp.0": f"{d}.ff_context.net.0.proj", f"{o}.txt_mlp.2": f"{d}.ff_context.net.2",
                    f"{o}.img_attn.proj": f"{d}.attn.to_out.0", f"{o}.txt_attn.proj": f"{d}.attn.to_add_out"}
        norms |= {f"{o}.img_attn.norm.query_norm": f"{d}.attn.norm_q", f"{o}.img_attn.norm.key_norm": f"{d}.attn.norm_k",
                  f"{o}.txt_attn.norm.query_norm": f"{d}.attn.norm_added_q",
                  f"{o}.txt_attn.norm.key_norm": f"{d}.attn.norm_added_k"}
    out = {}
    for i in range(count("single_transformer_blocks.")):
        o, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        renames |= {f"{o}.modulation.lin": f"{d}.norm.linear", f"{o}.linear2": f"{d}.proj_out"}
        norms |= {f"{o}.norm.query_norm": f"{d}.attn.norm_q", f"{o}.norm.key_norm": f"{d}.attn.norm_k"}
        for kind in ("weight", "bias"):
            parts = [f"{d}.attn.to_{x}.{kind}" for x in "qkv"] + [f"{d}.proj_mlp.{kind}"]
            out[f"{o}.linear1.{kind}"] = torch.cat([sd[p] for p in parts])
    for i in range(count("transformer_blocks.")):
        o, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{o}.img_attn.qkv.{kind}"] = torch.cat([sd[f"{d}.attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{o}.txt_attn.qkv.{kind}"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.{kind}"] for x in "qkv"])
    out |= {f"{original}.{kind}": sd[f"{ours}.{kind}"] for original, ours in renames.items()
            for kind in ("weight", "bias") if f"{ours}.{kind}" in sd}
    out |= {f"{original}.scale": sd[f"{ours}.weight"] for original, ours in norms.items()}
    out |= {f"final_layer.adaLN_modulation.1.{kind}": swap_halves(sd[f"norm_out.linear.{kind}"]) for kind in ("weight", "bias")}
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return path
