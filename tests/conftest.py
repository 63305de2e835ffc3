"""Shared pytest fixtures: a real local Ray cluster, a real S3-compatible server (moto), CLI runner.

Each section below is owned by the module it serves; add fixtures to the matching section.
"""

from __future__ import annotations

# --- S3 (moto ThreadedMotoServer on 127.0.0.1) ------------------------------------------------

# --- Ray ---------------------------------------------------------------------------------------

# --- CLI ---------------------------------------------------------------------------------------
