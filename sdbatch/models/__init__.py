"""Models: resolution of ``builtin:``, folders and remote prefixes, pins and the one pickle policy,
the download cache, the family table, and the torch runtime that runs them. May import:
``sdbatch.data``, ``sdbatch.storage``, ``sdbatch.errors``; torch, diffusers and transformers only in
``runtime``, ``lora_cache``, ``device``, ``clip_score`` and ``null_model``."""
