"""Models: resolution of ``builtin:``, folders and remote prefixes, pins and the one pickle policy,
the download cache, the family table with one adapter per family, and the torch runtime that runs
them. May import:
``sdbatch.data``, ``sdbatch.storage``, ``sdbatch.errors``; torch, diffusers and transformers only in
``runtime``, ``lora_cache``, ``device`` and ``clip_score``."""
