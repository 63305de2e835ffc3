"""The data model: the column and sampler tables, ``Row``, the index schema and the image record;
pure values. May import: ``sdbatch.errors``, pyarrow, the standard library."""
