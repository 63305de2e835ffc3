"""Tiny random-weight pipelines of issue 24's part-B families (Z-Image, Qwen-Image, FLUX.2
[klein] and [dev], SD3.5's layouts) built from configs as diffusers' own tests build theirs
(``get_dummy_components``), the LLM encoders' with a byte-level BPE tokenizer and chat template
built in code (no downloads), saved as diffusers folders with safetensors; and their
transformers written as GGUF files (``write_gguf``). Test-only."""

from __future__ import annotations

from pathlib import Path

import torch

#: the chat template Qwen tokenizers ship (Z-Image and FLUX.2 [klein] format their prompts with it)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: the Qwen2-VL tokens around and in an image's place (Qwen-Image-Edit's template holds them)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _byte_bpe(special: list[str]):
    """A byte-level BPE over the 256 byte symbols, a few merges and ``special`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(alphabet))}
    merges = [("Ġ", "a"), ("r", "e"), ("Ġ", "c"), ("i", "r")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for token in special:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special)
    return tok


def qwen_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer with the Qwen chat template."""
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast(tokenizer_object=_byte_bpe(SPECIAL), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE, model_max_length=32768)


#: Mistral's instruct template over message contents that are lists of text parts, as FLUX.2 [dev]'s
#: pipeline writes them (a system message and the prompt)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% else %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]


def mistral_tokenizer():
    """A Mistral-style tokenizer (byte-level BPE here) with the instruct chat template, as the
    ``tokenizer/`` folder of FLUX.2 [dev] holds one beside its PixtralProcessor's image settings."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(MISTRAL_SPECIAL), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", chat_template=MISTRAL_CHAT_TEMPLATE,
                                   model_max_length=131072)


def _kl_vae(blocks: int, latent_channels: int, **extra):
    """An AutoencoderKL of ``blocks`` levels (scale 2**(blocks-1)) without the mid-block
    attention, so decoding a 1024² image stays cheap on CPU."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
                         up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=[8] * blocks,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=32,
                         mid_block_add_attention=False, **extra)


def build_z_image(folder: Path, *, turbo: bool = False) -> Path:
    """Z-Image (or -Turbo: its scheduler config, a fixed shift of 3) at the pipeline's 1024²
    default: a VAE of scale 16, so the transformer sees 32×32 patches and sizes are on a 32 grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 64, 64])
    with torch.no_grad():  # created with torch.empty upstream
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    vae = _kl_vae(5, 4, scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer = qwen_tokenizer()
    encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer),
                                     max_position_embeddings=1024))
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False) if turbo
                 else FlowMatchEulerDiscreteScheduler(shift=6.0))
    pipe = ZImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=encoder,
                          tokenizer=tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _qwen_vl_encoder(tokenizer, **token_ids):
    """A tiny Qwen2.5-VL text encoder (one vision block) for ``tokenizer``; ``token_ids``: its vision tokens' ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = Qwen2_5_VLConfig(text_config=text, vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16,
                                                              "num_heads": 2, "out_hidden_size": 16},
                              hidden_size=16, vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, **token_ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_qwen_image(folder: Path) -> Path:
    """Qwen-Image with a tiny Qwen2.5-VL text encoder and its 3-D VAE with one level (scale 2): native 256²."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    z_dim = 4
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1] * z_dim, latents_std=[1.5] * z_dim)
    tokenizer = qwen_tokenizer()
    encoder = _qwen_vl_encoder(tokenizer)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=encoder, tokenizer=tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_qwen_image_edit(folder: Path) -> Path:
    """Qwen-Image-Edit: Qwen-Image's components with a VAE of scale 8 (three levels), so the
    source image the pipeline scales to about 1024² stays 4096 tokens, a tokenizer with the
    vision tokens, and ``processor/`` as the published folders hold it (the tokenizer and the
    Qwen2-VL image processor's settings; model_index.json names ``Qwen2VLProcessor``)."""
    import json

    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageTransformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    z_dim = 4
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.1] * z_dim, latents_std=[1.5] * z_dim)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=_byte_bpe([*SPECIAL, *VISION_TOKENS]), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE,
                                   model_max_length=32768)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    encoder = _qwen_vl_encoder(tokenizer, **ids)
    # saved without a processor object (transformers builds Qwen2VLProcessor only with torchvision)
    pipe = QwenImageEditPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                                 text_encoder=encoder, tokenizer=tokenizer, processor=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder / "processor")
    Qwen2VLImageProcessorPil().save_pretrained(folder / "processor")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "processor": ["transformers", "Qwen2VLProcessor"]}, indent=2))
    return folder


def build_flux2_klein_distilled(folder: Path) -> Path:
    return build_flux2_klein(folder, distilled=True)


def build_sd35_large(folder: Path) -> Path:
    """SD3.5 Large's layout: RMS qk-norm in every joint block."""
    from integration.model_families import build_sd3

    return build_sd3(folder, qk_norm="rms_norm")


def build_sd35_medium(folder: Path) -> Path:
    """SD3.5 Medium's layout (MMDiT-X): qk-norm and a second, image-only attention in the first block."""
    from integration.model_families import build_sd3

    return build_sd3(folder, qk_norm="rms_norm", dual_attention_layers=(0,))


def build_flux2_klein(folder: Path, *, distilled: bool = False) -> Path:
    """FLUX.2 [klein] (base, or the step-distilled variant: ``is_distilled``) with a tiny Qwen3
    causal LM deep enough for the pipeline's default hidden-state layers (9, 18, 27), whose
    three outputs side by side are the transformer's text width; a VAE of scale 2: native 256²."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hidden, latent_channels = 16, 2
    transformer = _flux2_transformer(3 * hidden, latent_channels, guidance=False)
    tokenizer = qwen_tokenizer()
    encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=hidden, intermediate_size=16, num_hidden_layers=28,
                                           num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                           vocab_size=len(tokenizer), max_position_embeddings=1024))
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux2_vae(latent_channels), text_encoder=encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=distilled)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _flux2_transformer(text_width: int, latent_channels: int, *, guidance: bool):
    """diffusers' test config of Flux2Transformer2DModel, reading ``text_width`` (three encoder
    layers side by side), with or without the guidance embedding."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(patch_size=1, in_channels=latent_channels * 4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=text_width,
                                   timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4], guidance_embeds=guidance)


def _flux2_vae(latent_channels: int):
    """FLUX.2's VAE with two levels (scale 2) and non-trivial batch-norm statistics, so
    de-normalising the latents is tested."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                             latent_channels=latent_channels, norm_num_groups=8, use_quant_conv=False,
                             use_post_quant_conv=False, mid_block_add_attention=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    return vae


def build_flux2_dev(folder: Path) -> Path:
    """FLUX.2 [dev] as diffusers' own test builds it (``get_dummy_components``), deep enough for
    the pipeline's default hidden-state layers (10, 20, 30) of its Mistral-3 encoder, with the
    guidance embedding; a VAE of scale 2: native 256². Its ``tokenizer`` is named a
    ``PixtralProcessor`` in model_index.json, as Black Forest Labs' folder names it, over a
    tokenizer saved in ``tokenizer/`` (a processor needs torchvision to be built)."""
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    hidden, latent_channels = 16, 2
    transformer = _flux2_transformer(3 * hidden, latent_channels, guidance=True)
    tokenizer = mistral_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"))}
    text = {"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 16,
            "max_position_embeddings": 1024, "num_attention_heads": 2, "num_hidden_layers": 30, "num_key_value_heads": 2,
            "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000000.0, "sliding_window": None,
            "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    vision = {"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 16, "image_size": 30, "patch_size": 6, "num_channels": 3}
    config = Mistral3Config(text_config=text, vision_config=vision, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                            pad_token_id=ids["pad"], image_seq_length=4, vision_feature_layer=-1,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    encoder = Mistral3ForConditionalGeneration(config).eval()
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux2_vae(latent_channels),
                         text_encoder=encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer": ["transformers", "PixtralProcessor"]}, indent=2))
    return folder


#: the transformer modules the test LoRAs of these families adapt (model_families.build_transformer_lora)
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def z_image_to_original(weights: dict) -> dict:
    """A diffusers Z-Image transformer's weights in Alibaba's original key layout, as the
    published Z-Image GGUFs hold them (fused ``attention.qkv``, ``attention.out``, ``q_norm``,
    ``final_layer``): the inverse of diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers``."""
    renames = {"all_final_layer.2-1.": "final_layer.", "all_x_embedder.2-1.": "x_embedder.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
               ".attention.norm_k.": ".attention.k_norm."}
    original = {}
    for name, tensor in weights.items():
        if ".attention.to_k." in name or ".attention.to_v." in name:
            continue  # fused into the block's qkv with its to_q
        if ".attention.to_q." in name:
            name, tensor = name.replace(".to_q.", ".qkv."), torch.cat([weights[name.replace(".to_q.", f".to_{x}.")]
                                                                       for x in "qkv"])
        for ours, theirs in renames.items():
            name = name.replace(ours, theirs)
        original[name] = tensor
    return original


def _renamed(name: str, table: dict[str, str]) -> str:
    """``name`` with the first ``table`` key it starts with (a whole dotted part) replaced."""
    for ours, theirs in table.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return name


#: FLUX.2's modules in diffusers' names -> Black Forest Labs' (the inverse of diffusers'
#: convert_flux2_transformer_checkpoint_to_diffusers): outside the blocks, in the double blocks
#: and in the single blocks; a norm's weight is BFL's ``scale``
FLUX2_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             **{f"{m}.linear": f"{m}.lin" for m in ("double_stream_modulation_img", "double_stream_modulation_txt",
                                                   "single_stream_modulation")}}
FLUX2_DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale", "attn.to_out.0": "img_attn.proj",
                "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q.weight": "norm.query_norm.scale",
                "attn.norm_k.weight": "norm.key_norm.scale"}


def flux2_to_original(weights: dict) -> dict:
    """A diffusers FLUX.2 transformer's weights in Black Forest Labs' key layout, as their
    checkpoint and the published FLUX.2 [dev] GGUFs name them (fused ``img_attn.qkv`` /
    ``txt_attn.qkv``, the final modulation's (shift, scale) order)."""
    original = {}
    for name, tensor in weights.items():
        if name.startswith("transformer_blocks."):
            _, n, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            fused = {"attn.to_q": ("img", ("to_q", "to_k", "to_v")), "attn.add_q_proj": ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))}
            if module in fused:
                stream, parts = fused[module]
                original[f"double_blocks.{n}.{stream}_attn.qkv.{kind}"] = torch.cat(
                    [weights[f"transformer_blocks.{n}.attn.{part}.{kind}"] for part in parts])
            elif module not in ("attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj"):
                original[f"double_blocks.{n}.{_renamed(rest, FLUX2_DOUBLE)}"] = tensor
        elif name.startswith("single_transformer_blocks."):
            _, n, rest = name.split(".", 2)
            original[f"single_blocks.{n}.{_renamed(rest, FLUX2_SINGLE)}"] = tensor
        elif name.startswith("norm_out.linear."):  # diffusers' (scale, shift) is BFL's (shift, scale): its own inverse
            first, second = tensor.chunk(2, dim=0)
            original[name.replace("norm_out.linear.", "final_layer.adaLN_modulation.1.")] = torch.cat([second, first])
        else:
            original[_renamed(name, FLUX2_TOP)] = tensor
    return original


def write_gguf(transformer_folder: Path, path: Path, *, quantized: bool, layout=None, arch: str = "qwen_image") -> Path:
    """A diffusers transformer's weights as a GGUF file, in its diffusers key names (as
    QuantStack publish Qwen-Image's, which diffusers' single-file loader takes unchanged) or in
    the key ``layout`` a function of the weights makes (a published original layout): with
    ``quantized``, each 2-D layer weight whose rows split into 32-value blocks as Q8_0 and the
    other layer weight matrices as F16, the rest F32 as published files keep them (biases, norms,
    Z-Image's pad tokens, which the model reads as they are); without, every tensor F32 (the
    same numbers as the folder)."""
    import gguf
    from safetensors.torch import load_file

    weights = load_file(transformer_folder / "diffusion_pytorch_model.safetensors")
    writer = gguf.GGUFWriter(str(path), arch)
    for name, tensor in (layout(weights) if layout else weights).items():
        values = tensor.float().numpy()
        matrix = quantized and values.ndim == 2 and name.endswith(".weight")
        if matrix and values.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values.astype("float16") if matrix else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_flux_kontext(folder: Path) -> Path:
    """A tiny FLUX.1 Kontext [dev]: FLUX.1 [dev]'s components (``FluxKontextPipeline`` takes the
    same ones) saved under the Kontext pipeline class."""
    import json

    from integration.model_families import build_flux

    build_flux(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}, indent=2))
    return folder
