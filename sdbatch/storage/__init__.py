"""Where bytes live: the ``Storage`` interface with create-once writes and compare-and-swap, a local
directory, S3, and the one decision whether a location is remote (``locations``). May import:
``sdbatch.errors``, boto3/botocore, pyarrow (design.md §5.2, §5.6)."""
