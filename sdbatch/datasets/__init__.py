"""Datasets from a finished OUT: export (Hugging Face imagefolder, webdataset), stats, X/Y grid
images. May import: ``output``, ``manifest`` (grid axes), ``data``, ``storage``, ``errors``;
duckdb, webdataset, PIL."""
