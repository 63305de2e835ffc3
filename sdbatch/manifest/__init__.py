"""Manifests: opening sources, reading rows, validating against the column table, and building
manifests from templates and grid axes. May import: ``data``, ``spec``, ``models``, ``storage``,
``errors``; pyarrow, numpy, dynamicprompts (builder)."""
