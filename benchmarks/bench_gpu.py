"""GPU throughput: an SD 1.5-shaped and an SDXL-shaped pipeline with random weights built from
their published configs (written inline below: real layer shapes, so the compute is real; no
downloads), fp16, 20 steps, batch 8 and 16, compile off and on, three contenders side by side:

  bare    the diffusers pipeline called in a loop, PIL images out and discarded (the ceiling);
  runner  ``worker.ShardRunner`` in-process: generate, encode, store and commit to a local dir;
  job     ``sdbatch submit`` (Ray, one GPU worker), steady-state rate from its commit times.

Prints images/s per contender and the ratios to ``bare`` (targets, design.md §10: job ≥ 0.95 ×
bare; SD 1.5 512² ≥ 11 img/s per H100-class GPU; SDXL 1024² ≥ 2.4 img/s per H200). Meant to
take ≤ 8 minutes on one H100/H200 (``--compile off`` for a shorter first look):

    python benchmarks/bench_gpu.py                 # on a machine with one CUDA GPU
    python benchmarks/bench_gpu.py --smoke         # on CPU: tiny shapes, fp32, 2 steps (checks the script)
    python benchmarks/bench_gpu.py --qwen-image --compile off --batches 8   # + Qwen-Image-shaped, bf16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from _common import PROMPTS, commit_rate
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
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


def build(family: str, smoke: bool, device: str, dtype: torch.dtype):
    """A random-weight pipeline of ``family`` ("sd15" or "sdxl"), built directly on ``device``."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    with torch.device(device):
        vae = AutoencoderKL(**(SMOKE_VAE if smoke else VAE))
        if family == "sd15":
            unet = UNet2DConditionModel(**(SMOKE_SD15_UNET if smoke else SD15_UNET))
            text = CLIPTextModel(CLIPTextConfig(**(SMOKE_CLIP if smoke else CLIP_L)))
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                           scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        else:
            unet = UNet2DConditionModel(**(SMOKE_SDXL_UNET if smoke else SDXL_UNET))
            clip_l = dict(SMOKE_CLIP if smoke else CLIP_L)
            text = CLIPTextModel(CLIPTextConfig(**clip_l))
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**(SMOKE_CLIP_G if smoke else CLIP_G)))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                             tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER))
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- Qwen/Qwen-Image's published configs (transformer 20B, Qwen2.5-VL-7B text encoder, 3-D VAE), and shrunk
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
SMOKE_QWEN_VAE = dict(QWEN_VAE, base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def build_qwen_image(smoke: bool, device: str, dtype: torch.dtype):
    """A random-weight Qwen-Image-shaped pipeline (bf16 ≈ 57 GB of weights), built in ``dtype``
    directly on ``device`` (an fp32 build would not fit); the tokenizer is the tests' byte-level
    Qwen2 one (its token ids fit any Qwen vocabulary)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    sys.path.insert(0, str(REPO / "tests"))
    from integration.families_2026 import qwen_tokenizer

    torch.manual_seed(0)
    text = SMOKE_QWEN_TEXT if smoke else QWEN_TEXT
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16} if smoke else {}
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = QwenImageTransformer2DModel(**(SMOKE_QWEN_TRANSFORMER if smoke else QWEN_TRANSFORMER))
            encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                text_config=text, vision_config=vision, hidden_size=text["hidden_size"], vocab_size=text["vocab_size"]))
            vae = AutoencoderKLQwenImage(**(SMOKE_QWEN_VAE if smoke else QWEN_VAE))
    finally:
        torch.set_default_dtype(default_dtype)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=encoder, tokenizer=qwen_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_image_bare(pipe, device: str, batch: int, size: int, steps: int, rows: int) -> float:
    """The plain loop, as a job with the model's defaults runs it: true CFG 4 against an empty negative prompt."""
    def run(n: int) -> None:
        pipe(prompt=[PROMPTS[i % len(PROMPTS)] for i in range(n)], negative_prompt=[""] * n, true_cfg_scale=4.0,
             height=size, width=size, num_inference_steps=steps, output_type="pil",
             generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)])

    with torch.inference_mode():
        run(batch)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(rows // batch):
            run(batch)
        sync(device)
    return (rows // batch * batch) / (time.perf_counter() - t0)


def qwen_image_rates(folder: Path, smoke: bool, device: str, no_job: bool) -> None:
    """Qwen-Image 1024² (smoke: 512², the tiny VAE's native size), 20 steps, bf16, batch 1 and 2:
    bare, then (the bare pipeline freed first: two copies do not fit one GPU) the job, printed as
    rows of the same table. The job reads the model from disk: about 60 GB free are needed."""
    dtype, dtype_name = (torch.float32, "float32") if smoke else (torch.bfloat16, "bfloat16")
    size, steps, rows = (512, 2, 4) if smoke else (1024, 20, 8)
    batches = (1, 2)
    pipe = build_qwen_image(smoke, device, dtype)
    model_dir = folder / "qwen-image"
    if not no_job:
        pipe.save_pretrained(model_dir, safe_serialization=True)
    bare = {batch: qwen_image_bare(pipe, device, batch, size, steps, rows) for batch in batches}
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()
    for batch in batches:
        job = None
        if not no_job:
            manifest = write_manifest(folder, rows + batch, size, steps)
            overrides = {**spec_overrides(model_dir, batch, dtype_name, False, device),
                         "defaults.guidance_scale": 4.0, "defaults.scheduler": "default"}
            job = job_rate(folder, manifest, overrides, rows + batch, batch)
        print(f"| qwen-image | {size}² | {batch} | off | {bare[batch]:.2f} | skipped | {cell(job, bare[batch])} |",
              flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_rate(pipe, device: str, batch: int, size: int, steps: int, rows: int, compile_unet: bool) -> float:
    """The plain loop: one pipeline call per batch, PIL out, per-row CPU generators (as sdbatch)."""
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)

    def run(n: int) -> None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        pipe(prompt=prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
             generator=generators, output_type="pil")

    with torch.inference_mode():
        run(batch)  # warm-up (and compile) for this shape
        sync(device)
        t0 = time.perf_counter()
        for _ in range(rows // batch):
            run(batch)
        sync(device)
    if compile_unet:
        pipe.unet = pipe.unet._orig_mod
    return (rows // batch * batch) / (time.perf_counter() - t0)


def write_manifest(folder: Path, rows: int, size: int, steps: int) -> Path:
    path = folder / f"rows-{rows}-{size}.parquet"
    pq.write_table(pa.table({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(rows)], "seed": list(range(rows)),
                             "width": [size] * rows, "height": [size] * rows, "steps": [steps] * rows}), path)
    return path


def spec_overrides(model_dir: Path, batch: int, dtype: str, compile_unet: bool, device: str) -> dict:
    return {"model.name": str(model_dir), "model.dtype": dtype, "model.compile": compile_unet, "model.device": device,
            "resources.batch_size": batch, "resources.rows_per_shard": batch, "defaults.guidance_scale": 7.5,
            "defaults.scheduler": "ddim", "resources.gpus_per_worker": 1 if device == "cuda" else 0}


def runner_rate(folder: Path, model_dir: Path, manifest: Path, overrides: dict, rows: int) -> float:
    """ShardRunner in-process; the first shard (model warm-up, compile) is not timed."""
    from sdbatch.manifest.reader import read_rows_at
    from sdbatch.manifest.sources import open_manifest
    from sdbatch.models.runtime import Generator
    from sdbatch.run.plan import job_plan
    from sdbatch.run.shard_runner import ShardRunner
    from sdbatch.spec import load_spec
    from sdbatch.storage.local import LocalStorage

    spec = load_spec(None, [], overrides)
    source = open_manifest(str(manifest))
    plan = job_plan(source, spec)
    generator = Generator.load(str(model_dir), device=spec.model.device, dtype=spec.model.dtype, compile=spec.model.compile)
    out = folder / f"runner-{time.monotonic_ns()}"
    runner = ShardRunner(generator, LocalStorage(out), spec, job_fingerprint="bench")
    shards = list(plan.pending())
    runner.run_shard(shards[0], read_rows_at(source, spec, shards[0].rows))
    t0 = time.perf_counter()
    for shard in shards[1:]:
        runner.run_shard(shard, read_rows_at(source, spec, shard.rows))
    return (rows - shards[0].num_rows) / (time.perf_counter() - t0)


def job_rate(folder: Path, manifest: Path, overrides: dict, rows: int, batch: int) -> float:
    out = folder / f"job-{time.monotonic_ns()}"
    sets = [f"--set={k}={v}" for k, v in overrides.items()]
    result = subprocess.run([sys.executable, "-m", "sdbatch", "submit", str(manifest), "--out", str(out), *sets],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise RuntimeError(f"sdbatch submit failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return commit_rate(out, rows, batch)


def cell(rate: float | None, bare: float) -> str:
    return "skipped" if rate is None else f"{rate:.2f} ({rate / bare:.2f}×)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32, 2 steps, batch 2: checks the script")
    p.add_argument("--rows", type=int, default=64, help="rows per measurement for SD 1.5 (SDXL: half)")
    p.add_argument("--batches", default="8,16")
    p.add_argument("--compile", default="off,on", help="off, on or off,on")
    p.add_argument("--no-job", action="store_true", help="skip the `sdbatch submit` contender")
    p.add_argument("--qwen-image", action="store_true", help="also the Qwen-Image-shaped configuration (bare vs job)")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    dtype, dtype_name = (torch.float32, "float32") if args.smoke else (torch.float16, "float16")
    steps = 2 if args.smoke else 20
    batches = [2] if args.smoke else [int(b) for b in args.batches.split(",")]
    compiles = [False] if args.smoke else [c == "on" for c in args.compile.split(",")]
    families = [("sd15", 64 if args.smoke else 512, args.rows), ("sdxl", 64 if args.smoke else 1024, max(args.rows // 2, 16))]
    if args.smoke:
        families = [(f, s, 6) for f, s, _ in families]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; {steps} steps, {dtype_name}")
    print("| model | size | batch | compile | bare img/s | runner img/s (÷bare) | job img/s (÷bare) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        for family, size, rows in families:
            pipe = build(family, args.smoke, device, dtype)
            model_dir = folder / family
            pipe.save_pretrained(model_dir, safe_serialization=True)
            for batch in batches:
                for compile_unet in compiles:
                    bare = bare_rate(pipe, device, batch, size, steps, rows, compile_unet)
                    manifest = write_manifest(folder, rows + batch, size, steps)  # + the warm-up shard
                    overrides = spec_overrides(model_dir, batch, dtype_name, compile_unet, device)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    runner = runner_rate(folder, model_dir, manifest, overrides, rows + batch)
                    job = None if args.no_job else job_rate(folder, manifest, overrides, rows + batch, batch)
                    print(f"| {family} | {size}² | {batch} | {'on' if compile_unet else 'off'} | {bare:.2f} | "
                          f"{cell(runner, bare)} | {cell(job, bare)} |", flush=True)
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
        if args.qwen_image:
            qwen_image_rates(folder, args.smoke, device, args.no_job)


if __name__ == "__main__":
    main()
