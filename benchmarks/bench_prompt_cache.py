"""Prompt-embedding reuse on CPU: a model whose text encoder is large relative to its denoiser
(SD 1.5's CLIP ViT-L/14 text encoder at its published size, 123M parameters, beside a small
UNet), a dataset manifest's shape (10 prompts × 8 seeds, batches of 8 mixing the prompts),
generated with and without ``PromptCache`` side by side; prints seconds per batch, the ratio,
the cache's hits and misses, and whether the images are byte-identical.

    python benchmarks/bench_prompt_cache.py [--prompts 10 --seeds 8 --steps 4 --batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import seconds_each  # noqa: E402
from bench_gpu import CLIP_L, SCHEDULER, SMOKE_SD15_UNET, SMOKE_VAE, TOKENIZER  # noqa: E402

from sdbatch.data.row import Row  # noqa: E402


def build(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SMOKE_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
        unet=UNet2DConditionModel(**{**SMOKE_SD15_UNET, "cross_attention_dim": CLIP_L["hidden_size"]}),
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def batches(prompts: int, seeds: int, batch: int, steps: int) -> list[list[Row]]:
    rows = [Row(index=i, id=f"r{i}", prompt=f"a photo of class {i % prompts}, detailed", negative_prompt="blurry",
                seed=i, steps=steps, guidance_scale=7.5, width=64, height=64, scheduler="ddim", extra={})
            for i in range(prompts * seeds)]
    return [rows[i:i + batch] for i in range(0, len(rows), batch)]


def run(model, work: list[list[Row]]) -> tuple[float, bytes]:
    model.generate(work[0])  # warm-up: first-call allocations
    model.prompts.__init__(model.prompts.max_bytes)  # and an empty cache again: every prompt is encoded once
    per_batch, pixels = seconds_each(work, lambda rows: model.generate(rows).pixels.tobytes())
    return per_batch, b"".join(pixels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from sdbatch.models.runtime import load_model

    with tempfile.TemporaryDirectory(prefix="bench-prompt-cache-") as tmp:
        folder = build(Path(tmp) / "clip-l-small-unet")
        work = batches(args.prompts, args.seeds, args.batch, args.steps)
        plain = load_model(str(folder), device="cpu", dtype="float32")
        for pipe in (plain.txt2img, plain.img2img):
            del pipe.encode_prompt  # the pipeline's own: every batch encodes its prompts
        cached = load_model(str(folder), device="cpu", dtype="float32")
        per_batch_plain, pixels_plain = run(plain, work)
        per_batch_cached, pixels_cached = run(cached, work)
    print(f"{args.prompts} prompts × {args.seeds} seeds, batch {args.batch}, {args.steps} steps, 64², "
          f"{args.threads} threads, CLIP-L text encoder (123M) + small UNet")
    print(f"per batch: encoding every batch {per_batch_plain:.3f} s, prompt cache {per_batch_cached:.3f} s "
          f"({per_batch_cached / per_batch_plain:.2f}×); cache hits {cached.prompts.hits}, misses {cached.prompts.misses}")
    print(f"images byte-identical: {pixels_plain == pixels_cached}")


if __name__ == "__main__":
    main()
