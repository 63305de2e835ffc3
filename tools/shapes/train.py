"""Train ``builtin:shapes``: a tiny latent diffusion model in the Stable Diffusion layout.

    python -m tools.shapes.train --out sdbatch/models/shapes --seed 0
    python -m tools.shapes.train --random-only --out sdbatch/models/tiny

Recipe (Stable Diffusion in miniature, CPU-sized):
1. ``AutoencoderKL`` (×4 down, 4 latent channels: 64×64 images → 16×16×4 latents) trained on
   reconstruction (MSE + L1) with a small KL weight; its ``scaling_factor`` is set to
   1/std of the training latents.
2. A fixed set of dataset images is encoded once (latent mean and log-variance kept, a fresh
   latent sample drawn every step).
3. ``UNet2DConditionModel`` (cross-attention on the hidden states of a small
   ``CLIPTextModel`` trained jointly) predicts the added noise (epsilon) at uniform random
   timesteps of SD's DDPM schedule (scaled_linear, 0.00085..0.012, 1000 steps); captions are
   dropped to "" 10% of the time so classifier-free guidance works.
The result is saved as a complete ``StableDiffusionPipeline`` folder (safetensors only), also
periodically during UNet training so an intermediate model is always usable.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tools.shapes import data as shapes_data
from tools.shapes.tokenizer import build_tokenizer


def log(msg: str, t0: float | None = None) -> None:
    prefix = f"[{time.time() - t0:7.1f}s] " if t0 is not None else ""
    print(prefix + msg, flush=True)


SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)


# Named size presets (measured on 2 CPU cores, see the model card).
VAE_PRESETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1),
}


UNET_PRESETS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8),
    "small": dict(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=8),
    "medium": dict(block_out_channels=(64, 128), layers_per_block=2, attention_head_dim=8),
    "wide": dict(block_out_channels=(96, 192), layers_per_block=1, attention_head_dim=16),
}


TEXT_PRESETS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}


def make_vae(preset: str):
    from diffusers import AutoencoderKL

    p = VAE_PRESETS[preset]
    n = len(p["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=p["block_out_channels"],
        layers_per_block=p["layers_per_block"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=1.0,
    )


def make_text_encoder(preset: str, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
        **TEXT_PRESETS[preset],
    )
    return CLIPTextModel(cfg)


def make_unet(preset: str, cross_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    p = UNET_PRESETS[preset]
    n = len(p["block_out_channels"])
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        block_out_channels=p["block_out_channels"],
        layers_per_block=p["layers_per_block"],
        attention_head_dim=p["attention_head_dim"],
        cross_attention_dim=cross_dim,
        norm_num_groups=32,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        prediction_type="epsilon",
    )


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, card: str | None = None) -> None:
    """Write a complete diffusers folder atomically (tmp folder + rename), safetensors only."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    for p in tmp.rglob("*.bin"):
        p.unlink()
    old_card = out / "README.md"
    if card is not None:
        (tmp / "README.md").write_text(card)
    elif old_card.is_file():
        shutil.copy(old_card, tmp / "README.md")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * prog)))


def random_model(out: Path, seed: int) -> None:
    """``builtin:tiny``: same classes and tokenizer, random weights, tiny sizes."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    vae = make_vae("small")
    te = make_text_encoder("tiny", tok)
    unet = make_unet("tiny", te.config.hidden_size, 16)
    card = (
        "# builtin:tiny\n\nRandom-weight Stable Diffusion-layout pipeline (AutoencoderKL "
        f"{n_params(vae)/1e6:.2f}M, UNet2DConditionModel {n_params(unet)/1e6:.2f}M, CLIPTextModel "
        f"{n_params(te)/1e6:.2f}M params; word-level CLIP tokenizer) for fast plumbing tests. "
        "It draws noise, not pictures.\n\nMade with `python -m tools.shapes.train "
        f"--random-only --seed {seed} --out sdbatch/models/tiny`.\n"
    )
    save_pipeline(out, vae, te, tok, unet, card)
    log(f"random model saved to {out}: vae {n_params(vae)} unet {n_params(unet)} te {n_params(te)}")


def train_vae(args, t0):
    vae = make_vae(args.vae_preset)
    log(f"VAE params {n_params(vae)/1e6:.3f}M", t0)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    bs = args.vae_batch
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr, args.warmup)
        x, _, _ = shapes_data.batch(args.seed + 1, step * bs, bs)
        x = torch.from_numpy(x)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / (z[0].numel())
        loss = mse + 0.1 * l1 + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} l1 {l1.item():.4f} kl {kl.item():.3f}", t0)
    vae.eval()
    return vae


@torch.no_grad()
def vae_holdout_mse(vae, seed: int, n: int = 128) -> float:
    x, _, _ = shapes_data.batch(seed, 10_000_000, n)
    x = torch.from_numpy(x)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return torch.nn.functional.mse_loss(rec, x).item()


@torch.no_grad()
def encode_dataset(vae, args, t0):
    means, logvars, scenes = [], [], []
    for start in range(0, args.n_latents, 256):
        n = min(256, args.n_latents - start)
        x, _, sc = shapes_data.batch(args.seed + 2, start, n)
        d = vae.encode(torch.from_numpy(x)).latent_dist
        means.append(d.mean)
        logvars.append(d.logvar)
        scenes += sc
    mean, logvar = torch.cat(means), torch.cat(logvars)
    # std of latent samples (what the UNet sees), as SD's scaling factor
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
    std = z.std().item()
    log(f"encoded {len(scenes)} latents; latent std {std:.4f} mean {z.mean().item():.4f}", t0)
    return mean, logvar, scenes, std


def train_unet(args, t0, vae, tok, mean, logvar, scenes, unet=None, text_encoder=None):
    from diffusers import DDPMScheduler

    if unet is None:
        text_encoder = make_text_encoder(args.text_preset, tok)
        unet = make_unet(args.unet_preset, text_encoder.config.hidden_size, 16)
    log(f"UNet params {n_params(unet)/1e6:.3f}M, text encoder {n_params(text_encoder)/1e6:.3f}M", t0)
    sched = DDPMScheduler(**SCHEDULE)
    acp = sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(
        [dict(params=list(unet.parameters()), mult=1.0),
         dict(params=list(text_encoder.parameters()), mult=args.te_lr_mult)],
        lr=args.unet_lr, weight_decay=1e-2,
    )
    unet.train()
    text_encoder.train()
    sf = vae.config.scaling_factor
    rng = np.random.default_rng(args.seed + (5 if args.resume_from else 3))
    bs = args.unet_batch
    n = mean.shape[0]
    last_save = time.time()
    ema = None
    for step in range(args.unet_stop_at or args.unet_steps):
        for g in opt.param_groups:
            g["lr"] = g["mult"] * lr_at(step, args.unet_steps, args.unet_lr, args.warmup)
        idx = rng.integers(0, n, size=bs)
        caps = [
            "" if rng.random() < args.uncond_prob else shapes_data.caption(scenes[i], rng)
            for i in idx
        ]
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        it = torch.from_numpy(idx)
        z0 = (mean[it] + torch.exp(0.5 * logvar[it]) * torch.randn_like(mean[it])) * sf
        noise = torch.randn_like(z0)
        if args.offset_noise:
            noise = noise + args.offset_noise * torch.randn(bs, 4, 1, 1)
        t = torch.randint(0, 1000, (bs,))
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        hid = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=hid).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f} ema {ema:.4f} lr {opt.param_groups[0]['lr']:.2e}", t0)
        if args.save_every_s and time.time() - last_save > args.save_every_s:
            unet.eval()
            text_encoder.eval()
            save_pipeline(Path(args.out), vae, text_encoder, tok, unet, card(args, step + 1, t0, ema))
            unet.train()
            text_encoder.train()
            last_save = time.time()
            log(f"checkpoint saved at unet step {step + 1}", t0)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, ema


def card(args, unet_steps_done: int, t0: float, unet_loss: float | None, extra: str = "") -> str:
    cmd = (
        f"python -m tools.shapes.train --out {args.out} --seed {args.seed} "
        f"--vae-steps {args.vae_steps} --unet-steps {args.unet_steps} "
        f"--vae-preset {args.vae_preset} --unet-preset {args.unet_preset} "
        f"--text-preset {args.text_preset} --vae-batch {args.vae_batch} "
        f"--unet-batch {args.unet_batch} --n-latents {args.n_latents}"
    )
    return f"""# builtin:shapes

A toy latent diffusion model in the Stable Diffusion layout (AutoencoderKL + UNet2DConditionModel
+ CLIPTextModel + a word-level CLIPTokenizer), trained by sdbatch from scratch on CPU on
synthetic 64×64 images of coloured shapes (`tools/shapes/data.py`). It draws what
simple prompts such as "a large red circle in the center, blue background" name.

It is **not** a substitute for real Stable Diffusion weights: it knows only the dataset's
words (colours {", ".join(shapes_data.COLOURS)}; shapes {", ".join(shapes_data.SHAPES)};
sizes small/large; positions left/right/top/bottom/center; plain or gradient backgrounds).

## Training

    {cmd}

- UNet steps done in this snapshot: {unet_steps_done} / {args.unet_steps}; elapsed {time.time() - t0:.0f} s
- UNet loss (EMA) at that point: {unet_loss if unet_loss is None else round(unet_loss, 4)}
{extra}
"""


def finetune_decoder(args) -> None:
    """Stage 4 (as SD's ft-MSE decoder): train only the VAE decoder of a finished model.

    The encoder is frozen, so the latents — and the UNet trained on them — stay valid.
    """
    from diffusers import AutoencoderKL

    t0 = time.time()
    out = Path(args.out)
    vae = AutoencoderKL.from_pretrained(out / "vae")
    before = vae_holdout_mse(vae.eval(), args.seed + 99)
    log(f"decoder fine-tune: held-out MSE before {before:.5f}", t0)
    for p in vae.parameters():
        p.requires_grad_(False)
    dec = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec, lr=args.vae_lr, weight_decay=0.0)
    vae.decoder.train()
    bs = args.vae_batch
    for step in range(args.decoder_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.decoder_steps, args.vae_lr, args.warmup)
        x, _, _ = shapes_data.batch(args.seed + 4, step * bs, bs)
        x = torch.from_numpy(x)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(rec, x)
        loss = mse + 0.1 * (rec - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.decoder_steps - 1:
            log(f"decoder step {step} mse {mse.item():.5f}", t0)
    vae.eval()
    after = vae_holdout_mse(vae, args.seed + 99)
    log(f"decoder fine-tune: held-out MSE after {after:.5f}", t0)
    tmp = out / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out / "vae")
    tmp.rename(out / "vae")
    summary = out / "training_summary.json"
    if summary.is_file():
        d = json.loads(summary.read_text())
        d["decoder_finetune"] = dict(steps=args.decoder_steps, holdout_mse_before=before,
                                     holdout_mse_after=after, wall_s=time.time() - t0)
        summary.write_text(json.dumps(d, indent=1))
    log("done", t0)


def ship(folder: Path, decoder_from: Path | None = None) -> None:
    """Make a trained folder ready to ship: optionally take the fine-tuned VAE decoder from
    another folder, then store the UNet and VAE weights as fp16 safetensors (half the size).

    diffusers loads them back as fp32 by default, exactly (fp16 -> fp32 is lossless); the
    text encoder stays fp32 because transformers would otherwise load it as fp16.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    if decoder_from is not None:
        shutil.rmtree(folder / "vae")
        shutil.copytree(Path(decoder_from) / "vae", folder / "vae")
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = cls.from_pretrained(folder / sub, torch_dtype=torch.float32)
        tmp = folder / (sub + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(folder / sub)
        tmp.rename(folder / sub)
    for p in folder.rglob("*.bin"):
        p.unlink()
    log(f"shipped {folder}: unet and vae stored as fp16")


def resume(args, t0, tok) -> None:
    """Continue UNet + text encoder training of a saved model (VAE and latents unchanged)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    src = Path(args.resume_from)
    vae = AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32)
    mean, logvar, scenes, _ = encode_dataset(vae, args, t0)
    t1 = time.time()
    unet, te, ema = train_unet(args, t0, vae, tok, mean, logvar, scenes, unet, te)
    extra = (f"- resumed from {src}; +{args.unet_steps} UNet steps at peak lr {args.unet_lr}, "
             f"{time.time() - t1:.0f} s; final loss (EMA) {ema:.4f}\n")
    save_pipeline(Path(args.out), vae, te, tok, unet, card(args, args.unet_steps, t0, ema, extra))
    log(f"done; saved to {args.out}", t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="sdbatch/models/shapes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-only", action="store_true", help="save a random-weight tiny model")
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-preset", default="small", choices=VAE_PRESETS)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--n-latents", type=int, default=20000)
    ap.add_argument("--unet-steps", type=int, default=2500)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--te-lr-mult", type=float, default=1.0,
                    help="text encoder learning rate = this × the UNet's")
    ap.add_argument("--unet-preset", default="small", choices=UNET_PRESETS)
    ap.add_argument("--text-preset", default="small", choices=TEXT_PRESETS)
    ap.add_argument("--uncond-prob", type=float, default=0.1)
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--save-every-s", type=float, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-decoder", action="store_true",
                    help="only fine-tune the VAE decoder of the model already in --out")
    ap.add_argument("--decoder-steps", type=int, default=300)
    ap.add_argument("--unet-stop-at", type=int, default=0,
                    help="stop UNet training after this many steps (the LR schedule still "
                         "spans --unet-steps): reproduces an intermediate checkpoint exactly")
    ap.add_argument("--resume-from", default=None,
                    help="continue UNet/text-encoder training of the model in this folder")
    ap.add_argument("--ship", action="store_true",
                    help="convert the model in --out to its shipped form (fp16 unet/vae)")
    ap.add_argument("--decoder-from", default=None,
                    help="with --ship: take vae/ from this folder (a decoder fine-tune)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    if args.random_only:
        random_model(out, args.seed)
        return
    if args.finetune_decoder:
        finetune_decoder(args)
        return
    if args.ship:
        ship(out, Path(args.decoder_from) if args.decoder_from else None)
        return
    t0 = time.time()
    tok = build_tokenizer()
    if args.resume_from:
        resume(args, t0, tok)
        return
    vae = train_vae(args, t0)
    vae_mse = vae_holdout_mse(vae, args.seed + 99)
    log(f"VAE held-out MSE (on [-1,1]) {vae_mse:.5f}", t0)
    vae_time = time.time() - t0
    mean, logvar, scenes, std = encode_dataset(vae, args, t0)
    vae.register_to_config(scaling_factor=float(1.0 / std))
    t1 = time.time()
    unet, te, ema = train_unet(args, t0, vae, tok, mean, logvar, scenes)
    extra = (
        f"- VAE: {args.vae_steps} steps, {vae_time:.0f} s, held-out MSE {vae_mse:.5f}; "
        f"scaling_factor {1.0 / std:.4f}\n- UNet + text encoder: {args.unet_steps} steps, "
        f"{time.time() - t1:.0f} s; final loss (EMA) {ema:.4f}\n"
        f"- Total wall time {time.time() - t0:.0f} s on {args.threads} CPU threads\n"
    )
    save_pipeline(out, vae, te, tok, unet, card(args, args.unet_steps, t0, ema, extra))
    (out / "training_summary.json").write_text(json.dumps(dict(
        vae_holdout_mse=vae_mse, scaling_factor=1.0 / std, unet_loss_ema=ema,
        wall_s=time.time() - t0, args=vars(args)), indent=1))
    log(f"done; saved to {out}", t0)


if __name__ == "__main__":
    main()
