"""GPU throughput per speed profile: SD 1.5-, SDXL-, FLUX.1- and Qwen-Image-shaped pipelines with
random weights built from their published configs (written inline below: real layer shapes, so the
compute is real; no downloads), three contenders side by side for each profile (``exact``,
``fast``, ``fastest``; ``sdbatch.models.speed``):

  bare    the diffusers pipeline called in a loop, the profile's switches applied to it with
          ``models.speed_runtime.apply_speed`` (PIL images out, discarded): the ceiling;
  runner  ``run.shard_runner.ShardRunner`` in-process: generate, encode, store and commit;
  job     ``sdbatch submit --speed PROFILE`` (Ray, one GPU worker), steady-state rate from its
          commit times.

Per cell: images/s and ÷ bare, seconds spent compiling (the warm-up call beyond a steady
batch), peak GPU memory (bare and runner, in this process), and for the lossy profiles the
mean absolute pixel difference (0–255) and PSNR against ``exact`` on the same rows (bare).
Targets (design.md §10): job ≥ 0.95 × bare per profile; SD 1.5 512² 20 steps ``fast`` ≥ 11
img/s; SDXL 1024² 20 steps ``fast`` ≥ 2.4 img/s; FLUX.1 1024² 28 steps ``fastest`` ≤ 2.0 s
per image. FLUX.1's text encoders are left out (prompt embeddings are given, as sdbatch's
prompt cache gives them after a prompt's first batch), so it runs bare only (its folder
would be ~24 GB to write, and sdbatch's job encodes prompts). Qwen-Image (1024², 20 steps,
true CFG 4 against an empty negative prompt, as a job with the model's defaults runs it) is
not in the default ``--families``: its bf16 weights are ~57 GB, built directly in bf16, and
saved once more for runner and job (~60 GB of free disk). Cells past ``--budget-s`` are
skipped, so one call fits ≤ 8 minutes on one H100/H200:

    python benchmarks/bench_gpu.py                 # on a machine with one CUDA GPU
    python benchmarks/bench_gpu.py --families qwen --contenders bare,job   # Qwen-Image (H200 for headroom)
    python benchmarks/bench_gpu.py --smoke         # on CPU: tiny shapes, fp32, 2 steps, no compilation (checks the script)
    python benchmarks/bench_gpu.py --smoke --families qwen --profiles exact --contenders bare

``--memory`` measures the memory options instead (README's memory table), on a FLUX.1 [dev]-shaped
pipeline with its text encoders (CLIP-L and T5-XXL, random weights), 1024², 28 steps, batch 2,
each beside bf16 with everything on the GPU ("plain"): its transformer quantized int8 weight-only with
torchao (what a folder saved with ``TorchAoConfig(Int8WeightOnlyConfig())`` loads to), and
``model.text_encoder_device=cpu`` (``models.text_encoders``: the encoders in host memory, the
embeddings handed to the GPU). Each distinct prompt is encoded once, where the encoders are (as
the worker's prompt cache does), then the rows are denoised from the embeddings: images/s,
seconds of encoding, peak GPU memory, and the mean absolute pixel difference and PSNR against
plain on the same rows (int8 is lossy; embeddings computed on the CPU may differ in the low bits). About 3–4 minutes on one H100/H200 (~34 GB of bf16
weights built on the GPU; the CPU contender encodes with T5-XXL on the host):

    python benchmarks/bench_gpu.py --memory
    python benchmarks/bench_gpu.py --memory --smoke   # on CPU: tiny shapes, fp32, 2 steps
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _common import PROMPTS, commit_rate
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "sdbatch" / "models" / "tiny" / "tokenizer"  # word-level; ids fit any CLIP vocab

# --- published configs (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
                 cross_attention_dim=2048, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# --- the same layouts, shrunk, for --smoke on CPU
SMOKE_VAE = dict(VAE, block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=8,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)
SMOKE_SD15_UNET = dict(SD15_UNET, sample_size=8, layers_per_block=1, block_out_channels=[32, 64], cross_attention_dim=32,
                       attention_head_dim=4, norm_num_groups=8,
                       down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
SMOKE_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
SMOKE_SDXL_UNET = dict(SDXL_UNET, sample_size=8, layers_per_block=1, block_out_channels=[32, 64], cross_attention_dim=64,
                       attention_head_dim=[2, 4], transformer_layers_per_block=[1, 1], norm_num_groups=8,
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
SMOKE_CLIP_G = dict(CLIP_G, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)


# black-forest-labs/FLUX.1-dev (transformer, vae); the text encoders are replaced by given embeddings
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=[16, 56, 56])
FLUX_VAE = dict(VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
FLUX_TOKENS = 512
SMOKE_FLUX_TRANSFORMER = dict(FLUX_TRANSFORMER, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                              axes_dims_rope=[4, 4, 8])
SMOKE_FLUX_VAE = dict(SMOKE_VAE, latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                      use_post_quant_conv=False)
SMOKE_FLUX_TOKENS = 16

# Qwen/Qwen-Image (transformer, Qwen2.5-VL text encoder, 3-D VAE); the tokenizer is the tests'
# byte-level Qwen2 one (its token ids fit any Qwen vocabulary)
QWEN_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=128000,
                 rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"})
QWEN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
                latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
SMOKE_QWEN_TRANSFORMER = dict(QWEN_TRANSFORMER, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
SMOKE_QWEN_TEXT = dict(QWEN_TEXT, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"})
SMOKE_QWEN_VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
SMOKE_QWEN_VAE = dict(QWEN_VAE, base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)

#: family → (size, steps, guidance, denoiser) at full scale; Qwen-Image's guidance is its true CFG scale
FAMILIES = {"sd15": (512, 20, 7.5, "unet"), "sdxl": (1024, 20, 7.5, "unet"), "flux": (1024, 28, 3.5, "transformer"),
            "qwen": (1024, 20, 4.0, "transformer")}
DEFAULT_FAMILIES = "sd15,sdxl,flux"  # qwen on request: ~57 GB of bf16 weights
PROFILES = ("exact", "fast", "fastest")


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_qwen_image(smoke: bool, dtype: torch.dtype):
    """Qwen-Image's modules, built in ``dtype``: an fp32 build (~114 GB) would not fit one GPU."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(REPO / "tests"))
    from integration.families_2026 import qwen_tokenizer

    text = SMOKE_QWEN_TEXT if smoke else QWEN_TEXT
    with default_dtype(dtype):
        encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=SMOKE_QWEN_VISION if smoke else {}, hidden_size=text["hidden_size"],
            vocab_size=text["vocab_size"]))
        return QwenImagePipeline(transformer=QwenImageTransformer2DModel(**(SMOKE_QWEN_TRANSFORMER if smoke else QWEN_TRANSFORMER)),
                                 vae=AutoencoderKLQwenImage(**(SMOKE_QWEN_VAE if smoke else QWEN_VAE)),
                                 scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=encoder, tokenizer=qwen_tokenizer())


def build(family: str, smoke: bool, device: str, dtype: torch.dtype):
    """A random-weight pipeline of ``family`` (``FAMILIES``), built directly on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        if family == "qwen":
            pipe = build_qwen_image(smoke, dtype)
        elif family == "flux":
            pipe = FluxPipeline(transformer=FluxTransformer2DModel(**(SMOKE_FLUX_TRANSFORMER if smoke else FLUX_TRANSFORMER)),
                                vae=AutoencoderKL(**(SMOKE_FLUX_VAE if smoke else FLUX_VAE)),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        else:
            tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
            vae = AutoencoderKL(**(SMOKE_VAE if smoke else VAE))
            if family == "sd15":
                pipe = StableDiffusionPipeline(
                    vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**(SMOKE_CLIP if smoke else CLIP_L))),
                    tokenizer=tokenizer, unet=UNet2DConditionModel(**(SMOKE_SD15_UNET if smoke else SD15_UNET)),
                    scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
            else:
                pipe = StableDiffusionXLPipeline(
                    vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**(SMOKE_CLIP if smoke else CLIP_L))),
                    text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**(SMOKE_CLIP_G if smoke else CLIP_G))),
                    tokenizer=tokenizer, tokenizer_2=tokenizer,
                    unet=UNet2DConditionModel(**(SMOKE_SDXL_UNET if smoke else SDXL_UNET)), scheduler=DDIMScheduler(**SCHEDULER))
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def flux_embeddings(n: int, smoke: bool, device: str, dtype: torch.dtype) -> dict:
    generator = torch.Generator("cpu").manual_seed(1)
    width = SMOKE_FLUX_TRANSFORMER if smoke else FLUX_TRANSFORMER
    tokens = SMOKE_FLUX_TOKENS if smoke else FLUX_TOKENS
    return {"prompt_embeds": torch.randn(n, tokens, width["joint_attention_dim"], generator=generator).to(device, dtype),
            "pooled_prompt_embeds": torch.randn(n, width["pooled_projection_dim"], generator=generator).to(device, dtype)}


def conditioning(family: str, first: int, n: int, guidance: float, smoke: bool, device: str, dtype: torch.dtype) -> dict:
    """The pipeline's text and guidance arguments for rows ``first`` … ``first + n - 1``."""
    prompts = [PROMPTS[(first + i) % len(PROMPTS)] for i in range(n)]
    if family == "flux":
        return {**flux_embeddings(n, smoke, device, dtype), "guidance_scale": guidance}
    if family == "qwen":  # true CFG against an empty negative prompt, as sdbatch runs it
        return {"prompt": prompts, "negative_prompt": [""] * n, "true_cfg_scale": guidance}
    return {"prompt": prompts, "guidance_scale": guidance}


def bare(pipe, family: str, profile: str, args, device: str, dtype: torch.dtype, batch: int, rows: int) -> dict:
    """The plain loop with ``profile`` applied: one call per batch, per-row CPU generators
    (as sdbatch), PIL out. Returns rate, compile seconds, peak memory and the pixels."""
    from sdbatch.models.speed import SpeedSpec
    from sdbatch.models.speed_runtime import apply_speed

    size, steps, guidance, denoiser = args.shape[family]
    applied = apply_speed(pipe, denoiser, SpeedSpec(profile=profile, **smoke_switches(args.smoke)), device)

    def run(first: int, n: int) -> list[np.ndarray]:
        generators = [torch.Generator("cpu").manual_seed(first + i) for i in range(n)]
        images = pipe(**conditioning(family, first, n, guidance, args.smoke, device, dtype), height=size, width=size,
                      num_inference_steps=steps, generator=generators, output_type="pil").images
        return [np.asarray(image) for image in images]

    reset_peak(device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        run(0, batch)  # warm-up (and compile) for this shape
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        pixels = [p for start in range(0, rows, batch) for p in run(start, batch)]
        sync(device)
        seconds = time.perf_counter() - t0
    per_batch = seconds / (rows // batch)
    return {"rate": len(pixels) / seconds, "compile_s": max(0.0, warm - per_batch), "peak": peak_gib(device),
            "pixels": pixels, "applied": applied}


def smoke_switches(smoke: bool) -> dict:
    """--smoke leaves compilation out: on CPU it takes minutes, and the smoke run checks the script."""
    return {"regional_compile": False, "cuda_graphs": False} if smoke else {}


def quality(pixels: list[np.ndarray], exact: list[np.ndarray]) -> tuple[float, float]:
    """Mean absolute difference (0–255) and PSNR (dB) of the same rows against ``exact``."""
    a = np.stack(pixels).astype(np.float64)
    b = np.stack(exact).astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    return float(np.abs(a - b).mean()), float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# google/t5-v1_1-xxl's encoder, as FLUX.1 [dev]'s text_encoder_2 (its d_model is the transformer's
# joint_attention_dim); the tokenizer is the tests' small T5 one (its ids fit any T5 vocabulary)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
SMOKE_T5 = dict(T5_XXL, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1)
#: the memory options measured beside plain bf16, all on the GPU (--memory): (label, transformer int8
#: weight-only, encoders on the CPU)
MEMORY_OPTIONS = (("plain", False, False), ("torchao int8 weight-only transformer", True, False),
                  ("text_encoder_device=cpu", False, True))


def build_flux_with_encoders(smoke: bool, device: str, dtype: torch.dtype):
    """FLUX.1 [dev]'s pipeline with its CLIP-L and T5-XXL text encoders, built on ``device``."""
    from transformers import T5Config, T5EncoderModel

    sys.path.insert(0, str(REPO / "tests"))
    from integration.model_families import _t5_tokenizer

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):  # in bf16 from the start: ~34 GB, not fp32's ~68
        pipe = FluxPipeline(transformer=FluxTransformer2DModel(**(SMOKE_FLUX_TRANSFORMER if smoke else FLUX_TRANSFORMER)),
                            vae=AutoencoderKL(**(SMOKE_FLUX_VAE if smoke else FLUX_VAE)),
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                            text_encoder=CLIPTextModel(CLIPTextConfig(**(SMOKE_CLIP if smoke else CLIP_L))),
                            tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
                            text_encoder_2=T5EncoderModel(T5Config(**(SMOKE_T5 if smoke else T5_XXL))),
                            tokenizer_2=_t5_tokenizer())
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def memory_option(label: str, int8: bool, encoders_on_cpu: bool, args, device: str, dtype: torch.dtype) -> dict:
    """One memory option on a fresh FLUX.1-shaped pipeline: each distinct prompt encoded once where
    the encoders are, then the rows denoised from the embeddings in batches (a warm-up batch first).
    Returns images/s, encoding seconds, peak GPU memory and the pixels."""
    from sdbatch.models.text_encoders import encode_on, place

    pipe = build_flux_with_encoders(args.smoke, device, dtype)
    if int8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(pipe.transformer, Int8WeightOnlyConfig())
    if encoders_on_cpu:
        place(pipe, device, "cpu")
        encode_on(pipe, "cpu")
    size, steps, guidance, _ = args.shape["flux"]
    tokens = SMOKE_FLUX_TOKENS if args.smoke else FLUX_TOKENS
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.memory_rows)]
    reset_peak(device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        distinct = sorted(set(prompts))
        embeds, pooled, _ = pipe.encode_prompt(distinct, None, device=torch.device(device), max_sequence_length=tokens)
        sync(device)
        encode_s = time.perf_counter() - t0
        at = {prompt: i for i, prompt in enumerate(distinct)}

        def run(first: int, n: int) -> list[np.ndarray]:
            rows = [at[prompts[(first + i) % len(prompts)]] for i in range(n)]
            generators = [torch.Generator("cpu").manual_seed(first + i) for i in range(n)]
            images = pipe(prompt_embeds=embeds[rows], pooled_prompt_embeds=pooled[rows], guidance_scale=guidance,
                          height=size, width=size, num_inference_steps=steps, generator=generators, output_type="pil").images
            return [np.asarray(image) for image in images]

        run(0, args.memory_batch)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        pixels = [p for first in range(0, args.memory_rows, args.memory_batch) for p in run(first, args.memory_batch)]
        sync(device)
        seconds = time.perf_counter() - t0
    return {"label": label, "rate": len(pixels) / seconds, "encode_s": encode_s, "prompts": len(distinct),
            "peak": peak_gib(device), "pixels": pixels, "encoders": "cpu" if encoders_on_cpu else device}


def memory_table(args, device: str, started: float) -> None:
    """--memory: each option of MEMORY_OPTIONS beside bf16, in one table (cells past --budget-s skipped)."""
    size, steps, _, _ = args.shape["flux"]
    dtype = torch.float32 if args.smoke else torch.bfloat16
    print("| model | memory option | size, steps, dtype | batch | img/s (÷ plain) | s/image | encode s (prompts, where) | "
          "peak GiB (÷ plain) | MAD / PSNR vs plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for label, int8, encoders_on_cpu in MEMORY_OPTIONS:
        if not args.smoke and time.monotonic() - started > args.budget_s:
            print(f"| flux | {label} | skipped: past --budget-s {args.budget_s:g} |", flush=True)
            continue
        m = memory_option(label, int8, encoders_on_cpu, args, device, dtype)
        reset_peak(device)  # the option's pipeline is gone with its call
        base = base or m  # plain comes first
        mad, psnr = quality(m["pixels"], base["pixels"])
        lossy = f"{mad:.2f} / {psnr:.1f} dB" if m is not base else "—"
        peak_ratio = m["peak"] / base["peak"] if m["peak"] and base["peak"] else None
        print(f"| flux | {label} | {size}², {steps}, {str(dtype).removeprefix('torch.')} | {args.memory_batch} | "
              f"{m['rate']:.2f} ({m['rate'] / base['rate']:.2f}×) | {1 / m['rate']:.2f} | {m['encode_s']:.1f} ({m['prompts']}, {m['encoders']}) | "
              f"{fmt(m['peak'])} ({fmt(peak_ratio)}×) | {lossy} |", flush=True)


def write_manifest(folder: Path, rows: int, size: int, steps: int) -> Path:
    path = folder / f"rows-{rows}-{size}.parquet"
    pq.write_table(pa.table({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(rows)], "seed": list(range(rows)),
                             "width": [size] * rows, "height": [size] * rows, "steps": [steps] * rows}), path)
    return path


def spec_overrides(model_dir: Path, batch: int, dtype: str, profile: str, device: str, guidance: float,
                   smoke: bool, size: int) -> dict:
    # the default size is the rows' own: left null, it would be the model's native size, which the
    # --smoke models' (16²) is below the job's 64 minimum, and the job would be refused
    return {**{f"speed.{k}": v for k, v in smoke_switches(smoke).items()}, "model.name": str(model_dir),
            "defaults.width": size, "defaults.height": size,
            "model.dtype": dtype, "model.device": device, "speed.profile": profile,
            "resources.batch_size": batch, "resources.rows_per_shard": batch, "defaults.guidance_scale": guidance,
            "defaults.scheduler": "default", "resources.gpus_per_worker": 1 if device == "cuda" else 0}


def runner(folder: Path, manifest: Path, overrides: dict, rows: int, device: str) -> dict:
    """ShardRunner in-process; the first shard (model warm-up, compile) is not timed."""
    from sdbatch.manifest.reader import read_rows_at
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.models.runtime import load_model
    from sdbatch.run.plan import job_plan
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    spec = load_spec(None, [], overrides)
    source = open_manifest(str(manifest))
    plan = job_plan(source, spec)
    generator = load_model(spec.model.name, device=spec.model.device, dtype=spec.model.dtype, speed=spec.speed)
    runner = ShardRunner(generator, LocalStorage(folder / f"runner-{time.monotonic_ns()}"), spec, job_fingerprint="bench")
    shards = list(plan.pending())
    reset_peak(device)
    runner.run_shard(shards[0], read_rows_at(source, spec, shards[0].rows))
    t0 = time.perf_counter()
    for shard in shards[1:]:
        runner.run_shard(shard, read_rows_at(source, spec, shard.rows))
    sync(device)
    result = {"rate": (rows - shards[0].num_rows) / (time.perf_counter() - t0),
              "compile_s": getattr(generator, "warmup_seconds", 0.0), "peak": peak_gib(device)}
    del runner, generator
    return result


def job_rate(folder: Path, manifest: Path, overrides: dict, rows: int, batch: int) -> float:
    out = folder / f"job-{time.monotonic_ns()}"
    sets = [f"--set={k}={v}" for k, v in overrides.items()]
    result = subprocess.run([sys.executable, "-m", "sdbatch", "submit", str(manifest), "--out", str(out), *sets],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise RuntimeError(f"sdbatch submit failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return commit_rate(out, rows, batch)


def fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    return "—" if value is None else pattern.format(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32, 2 steps, batch 2: checks the script")
    p.add_argument("--families", default=DEFAULT_FAMILIES, help=f"of {','.join(FAMILIES)}")
    p.add_argument("--profiles", default=",".join(PROFILES))
    p.add_argument("--contenders", default="bare,runner,job")
    p.add_argument("--batch", type=int, default=0, help="rows per batch (default: sd15 16, sdxl 8, flux 4, qwen 2)")
    p.add_argument("--rows", type=int, default=0, help="rows per measurement (default: 4 batches)")
    p.add_argument("--budget-s", type=float, default=450,
                   help="skip the cells that would start after this many seconds (not with --smoke)")
    p.add_argument("--memory", action="store_true",
                   help="measure the memory options (torchao int8, text encoders on the CPU) beside bf16 instead")
    p.add_argument("--memory-batch", type=int, default=2, help="rows per batch with --memory")
    p.add_argument("--memory-rows", type=int, default=4, help="rows timed per option with --memory (after a warm-up batch)")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    started = time.monotonic()
    args.shape = {f: ((64, 2, g, d) if args.smoke else (s, n, g, d)) for f, (s, n, g, d) in FAMILIES.items()}
    dtypes = {"sd15": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16, "qwen": torch.bfloat16}
    contenders = set(args.contenders.split(","))
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    if args.memory:
        memory_table(args, device, started)
        print(f"total {time.monotonic() - started:.0f} s")
        return
    print("| model | profile | size, steps | batch | bare img/s | runner img/s (÷bare) | job img/s (÷bare) | "
          "s/image (bare) | compile s (bare / runner) | peak GiB (bare / runner) | MAD / PSNR vs exact | applied |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        for family in args.families.split(","):
            size, steps, guidance, _ = args.shape[family]
            dtype = torch.float32 if args.smoke else dtypes[family]
            dtype_name = str(dtype).removeprefix("torch.")
            batch = args.batch or (2 if args.smoke else {"sd15": 16, "sdxl": 8, "flux": 4, "qwen": 2}[family])
            rows = args.rows or (batch if args.smoke else 4 * batch)
            model_dir = None
            sdbatch_runs = family != "flux"  # its folder here has no text encoders (and would be ~24 GB)
            exact_pixels = None
            for profile in args.profiles.split(","):
                if not args.smoke and time.monotonic() - started > args.budget_s:
                    print(f"| {family} | {profile} | skipped: past --budget-s {args.budget_s:g} |", flush=True)
                    continue
                pipe = build(family, args.smoke, device, dtype)  # fresh: a profile changes the modules
                if model_dir is None and sdbatch_runs and contenders & {"runner", "job"}:
                    model_dir = folder / family
                    pipe.save_pretrained(model_dir, safe_serialization=True)
                b = bare(pipe, family, profile, args, device, dtype, batch, rows)
                del pipe
                reset_peak(device)
                if profile == "exact":
                    exact_pixels = b["pixels"]
                mad_psnr = (f"{quality(b['pixels'], exact_pixels)[0]:.2f} / {quality(b['pixels'], exact_pixels)[1]:.1f} dB"
                            if exact_pixels is not None and profile != "exact" else "—")
                r = j = None
                if model_dir is not None:
                    manifest = write_manifest(folder, rows + batch, size, steps)  # + the warm-up shard
                    overrides = spec_overrides(model_dir, batch, dtype_name, profile, device, guidance, args.smoke, size)
                    if "runner" in contenders:
                        r = runner(folder, manifest, overrides, rows + batch, device)
                        reset_peak(device)
                    if "job" in contenders:
                        j = job_rate(folder, manifest, overrides, rows + batch, batch)
                applied = ", ".join(f"{k}={v}" if v is not True else k for k, v in b["applied"].applied.items()) or "—"
                print(f"| {family} | {profile} | {size}², {steps} | {batch} | {b['rate']:.2f} | "
                      f"{fmt(r and r['rate'])} ({fmt(r and r['rate'] / b['rate'])}×) | {fmt(j)} ({fmt(j and j / b['rate'])}×) | "
                      f"{1 / b['rate']:.2f} | {b['compile_s']:.1f} / {fmt(r and r['compile_s'], '{:.1f}')} | "
                      f"{fmt(b['peak'])} / {fmt(r and r['peak'])} | {mad_psnr} | {applied} |", flush=True)
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
