"""sdbatch: distributed, resumable, reproducible batch image generation for Stable Diffusion."""

__version__ = "0.1.0"
