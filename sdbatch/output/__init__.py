"""OUT: the commit protocol, the index merge, the job's claim and clear, the two layouts, image
encoding, the job-state documents, the lock, quality measures (design.md §5). May import:
``data``, ``manifest``, ``spec``, ``models``, ``storage``, ``errors``; pyarrow, PIL, imagehash and
duckdb (lazily)."""
