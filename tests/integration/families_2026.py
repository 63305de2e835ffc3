"""Tiny random-weight pipelines of issue 24's part-B families (Z-Image, Qwen-Image, FLUX.2
[klein], SD3.5's layouts) built from configs as diffusers' own tests build theirs
(``get_dummy_components``), the LLM encoders' with a byte-level BPE tokenizer and chat template
built in code (no downloads), saved as diffusers folders with safetensors. Test-only."""

from __future__ import annotations

from pathlib import Path

import torch

#: the chat template Qwen tokenizers ship (Z-Image and FLUX.2 [klein] format their prompts with it)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen_tokenizer():
    """A Qwen2-style byte-level BPE tokenizer over the 256 byte symbols and a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(alphabet))}
    merges = [("Ġ", "a"), ("r", "e"), ("Ġ", "c"), ("i", "r")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    for token in SPECIAL:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, chat_template=CHAT_TEMPLATE, model_max_length=32768)


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


def build_qwen_image(folder: Path) -> Path:
    """Qwen-Image with a tiny Qwen2.5-VL text encoder and its 3-D VAE with one level (scale 2): native 256²."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    z_dim = 4
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=z_dim, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1] * z_dim, latents_std=[1.5] * z_dim)
    tokenizer = qwen_tokenizer()
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = Qwen2_5_VLConfig(text_config=text, vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16,
                                                              "num_heads": 2, "out_hidden_size": 16},
                              hidden_size=16, vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=encoder, tokenizer=tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
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
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hidden, latent_channels = 16, 2
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=latent_channels * 4, num_layers=1,
                                          num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=3 * hidden, timestep_guidance_channels=256,
                                          axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False)
    tokenizer = qwen_tokenizer()
    encoder = Qwen3ForCausalLM(Qwen3Config(hidden_size=hidden, intermediate_size=16, num_hidden_layers=28,
                                           num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                           vocab_size=len(tokenizer), max_position_embeddings=1024))
    vae = AutoencoderKLFlux2(sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                             latent_channels=latent_channels, norm_num_groups=8, use_quant_conv=False,
                             use_post_quant_conv=False, mid_block_add_attention=False)
    with torch.no_grad():  # non-trivial latent statistics, so de-normalising them is tested
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=distilled)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


#: the transformer modules the test LoRAs of these families adapt (model_families.build_transformer_lora)
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def write_gguf(transformer_folder: Path, path: Path, *, quantized: bool) -> Path:
    """A diffusers transformer's weights as a GGUF file, as QuantStack publish Qwen-Image's (its
    diffusers key names, which diffusers' single-file loader takes unchanged): with
    ``quantized``, each 2-D weight whose rows split into 32-value blocks as Q8_0 and the other
    matrices as F16; without, every tensor F32 (the same numbers as the folder)."""
    import gguf
    from safetensors.torch import load_file

    writer = gguf.GGUFWriter(str(path), "qwen_image")
    for name, tensor in load_file(transformer_folder / "diffusion_pytorch_model.safetensors").items():
        values = tensor.float().numpy()
        if quantized and values.ndim == 2 and values.shape[1] % 32 == 0:
            blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values.astype("float16") if quantized and values.ndim == 2 else values)
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
