"""GPU throughput: SD 1.5-shaped, SDXL-shaped and FLUX.1 [dev]-shaped pipelines with random
weights built from their published configs (written inline below: real layer shapes, so the
compute is real; no downloads), SD in fp16 at 20 steps, FLUX.1 in bf16 at its 28 steps and
guidance 3.5, batch 8 and 16 (FLUX.1: 4 and 8), compile off and on, three contenders side by side:

  bare    the diffusers pipeline called in a loop, PIL images out and discarded (the ceiling);
  runner  ``worker.ShardRunner`` in-process: generate, encode, store and commit to a local dir;
  job     ``sdbatch submit`` (Ray, one GPU worker), steady-state rate from its commit times.

Prints images/s per contender and the ratios to ``bare`` (targets, design.md §10: job ≥ 0.95 ×
bare; SD 1.5 512² ≥ 11 img/s per H100-class GPU; SDXL 1024² ≥ 2.4 img/s per H200). Meant to
take ≤ 8 minutes on one H100/H200 (``--compile off`` for a shorter first look):

    python benchmarks/bench_gpu.py                 # on a machine with one CUDA GPU
    python benchmarks/bench_gpu.py --smoke         # on CPU: tiny shapes, fp32, 2 steps (checks the script)
    python benchmarks/bench_gpu.py --models flux   # FLUX.1 [dev] alone (≈ 34 GB of bf16 weights)
    python benchmarks/bench_gpu.py --models qwen   # Qwen-Image alone (≈ 57 GB of bf16 weights; bare and job)
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
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

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

# --- black-forest-labs/FLUX.1-dev: transformer, T5-XXL encoder, its 16-channel VAE, its scheduler
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                        axes_dims_rope=[16, 56, 56])
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new", pad_token_id=0, eos_token_id=1)
FLUX_VAE = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                scaling_factor=0.3611)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)

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
SMOKE_FLUX_TRANSFORMER = dict(FLUX_TRANSFORMER, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
SMOKE_T5 = dict(T5_XXL, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1)
SMOKE_FLUX_VAE = dict(SMOKE_VAE, latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                      scaling_factor=0.3611)

#: what differs per family: the pipeline call's guidance, the denoiser compiled, sdbatch's spec
CALL = {"sd15": {"guidance_scale": 7.5}, "sdxl": {"guidance_scale": 7.5}, "flux": {"guidance_scale": 3.5, "max_sequence_length": 512}}
DENOISER = {"sd15": "unet", "sdxl": "unet", "flux": "transformer"}
SPEC = {"sd15": {"defaults.guidance_scale": 7.5, "defaults.scheduler": "ddim"},
        "sdxl": {"defaults.guidance_scale": 7.5, "defaults.scheduler": "ddim"},
        "flux": {},  # the model's own: 3.5, its flow-matching scheduler
        "qwen": {}}  # the model's own: true CFG 4 against the (empty) negative prompt


def t5_tokenizer():
    """A T5-style (Unigram) tokenizer over the benchmark prompts' words, built in code (no
    download); its ids fit T5's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted({w for p in PROMPTS for w in p.lower().split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(w, -2.0) for w in words]
    vocab += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                           model_max_length=512)


def build(family: str, smoke: bool, device: str, dtype: torch.dtype):
    """A random-weight pipeline of ``family`` ("sd15", "sdxl" or "flux"), built directly on ``device``."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    with torch.device(device):
        vae = AutoencoderKL(**(SMOKE_VAE if smoke else VAE))
        if family == "flux":
            text = CLIPTextModel(CLIPTextConfig(**(SMOKE_CLIP if smoke else CLIP_L)))
            pipe = FluxPipeline(vae=AutoencoderKL(**(SMOKE_FLUX_VAE if smoke else FLUX_VAE)), text_encoder=text,
                                tokenizer=tokenizer, text_encoder_2=T5EncoderModel(T5Config(**(SMOKE_T5 if smoke else T5_XXL))),
                                tokenizer_2=t5_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
                                transformer=FluxTransformer2DModel(**(SMOKE_FLUX_TRANSFORMER if smoke else FLUX_TRANSFORMER)))
        elif family == "sd15":
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
    bare, then (the bare pipeline freed first: two copies do not fit one GPU, so no in-process
    runner) the job, printed as rows of the same table. The job reads the model from disk: about
    60 GB free are needed."""
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
            overrides = spec_overrides("qwen", model_dir, batch, dtype_name, False, device)
            job = job_rate(folder, manifest, overrides, rows + batch, batch)
        print(f"| qwen-image | {size}² | {steps}, {dtype_name} | {batch} | off | {bare[batch]:.2f} | skipped | "
              f"{cell(job, bare[batch])} |", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bare_rate(pipe, family: str, device: str, batch: int, size: int, steps: int, rows: int, compile_unet: bool) -> float:
    """The plain loop: one pipeline call per batch, PIL out, per-row CPU generators (as sdbatch)."""
    denoiser = DENOISER[family]
    if compile_unet:
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser)))

    def run(n: int) -> None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        pipe(prompt=prompts, height=size, width=size, num_inference_steps=steps, generator=generators, output_type="pil",
             **CALL[family])

    with torch.inference_mode():
        run(batch)  # warm-up (and compile) for this shape
        sync(device)
        t0 = time.perf_counter()
        for _ in range(rows // batch):
            run(batch)
        sync(device)
    if compile_unet:
        setattr(pipe, denoiser, getattr(pipe, denoiser)._orig_mod)
    return (rows // batch * batch) / (time.perf_counter() - t0)


def write_manifest(folder: Path, rows: int, size: int, steps: int) -> Path:
    path = folder / f"rows-{rows}-{size}.parquet"
    pq.write_table(pa.table({"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(rows)], "seed": list(range(rows)),
                             "width": [size] * rows, "height": [size] * rows, "steps": [steps] * rows}), path)
    return path


def spec_overrides(family: str, model_dir: Path, batch: int, dtype: str, compile_unet: bool, device: str) -> dict:
    return {"model.name": str(model_dir), "model.dtype": dtype, "model.compile": compile_unet, "model.device": device,
            "resources.batch_size": batch, "resources.rows_per_shard": batch, **SPEC[family],
            "resources.gpus_per_worker": 1 if device == "cuda" else 0}


def runner_rate(folder: Path, model_dir: Path, manifest: Path, overrides: dict, rows: int) -> float:
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
    generator = load_model(str(model_dir), device=spec.model.device, dtype=spec.model.dtype, compile=spec.model.compile)
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
    p.add_argument("--models", default="sd15,sdxl,flux", help="which of sd15, sdxl, flux, qwen (Qwen-Image)")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    compiles = [False] if args.smoke else [c == "on" for c in args.compile.split(",")]
    # family, size, rows, steps, batches, dtype: FLUX.1 in bf16 (fp16 overflows in its activations)
    sd_batches = [int(b) for b in args.batches.split(",")]
    families = [("sd15", 512, args.rows, 20, sd_batches, torch.float16),
                ("sdxl", 1024, max(args.rows // 2, 16), 20, sd_batches, torch.float16),
                ("flux", 1024, max(args.rows // 4, 16), 28, [max(b // 2, 1) for b in sd_batches], torch.bfloat16)]
    families = [f for f in families if f[0] in args.models.split(",")]
    if args.smoke:
        families = [(f, 64, 6, 2, [2], torch.float32) for f, *_ in families]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}")
    print("| model | size | steps, dtype | batch | compile | bare img/s | runner img/s (÷bare) | job img/s (÷bare) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        folder = Path(tmp)
        for family, size, rows, steps, batches, dtype in families:
            dtype_name = str(dtype).removeprefix("torch.")
            pipe = build(family, args.smoke, device, dtype)
            model_dir = folder / family
            pipe.save_pretrained(model_dir, safe_serialization=True)
            for batch in batches:
                for compile_unet in compiles:
                    bare = bare_rate(pipe, family, device, batch, size, steps, rows, compile_unet)
                    manifest = write_manifest(folder, rows + batch, size, steps)  # + the warm-up shard
                    overrides = spec_overrides(family, model_dir, batch, dtype_name, compile_unet, device)
                    if device == "cuda":
                        torch.cuda.empty_cache()
                    runner = runner_rate(folder, model_dir, manifest, overrides, rows + batch)
                    job = None if args.no_job else job_rate(folder, manifest, overrides, rows + batch, batch)
                    print(f"| {family} | {size}² | {steps}, {dtype_name} | {batch} | {'on' if compile_unet else 'off'} | {bare:.2f} | "
                          f"{cell(runner, bare)} | {cell(job, bare)} |", flush=True)
            del pipe
            if device == "cuda":
                torch.cuda.empty_cache()
        if "qwen" in args.models.split(","):
            qwen_image_rates(folder, args.smoke, device, args.no_job)


if __name__ == "__main__":
    main()
