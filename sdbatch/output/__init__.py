"""OUT: the layout and commit protocol (design.md §5.1, §5.3).

    OUT/_sdbatch/job.json        the job record, written first
    OUT/_sdbatch/lock.json       the running driver's lease
    OUT/_sdbatch/progress.json   progress snapshot
    OUT/images/NNNNN/<id>.<ext>  format=files        | OUT/shards/NNNNN.tar  format=webdataset
    OUT/metadata/NNNNN.parquet   the shard index — written last: it IS the shard's commit
    OUT/index.parquet            all shard indexes merged, once every shard is committed
    OUT/_SUCCESS                 JSON summary, written last of all

A shard is done exactly when its metadata file exists and carries this job's fingerprint (in
its Parquet key-value metadata); readers trust such commits, never a listing of images/. A new
job claims only an OUT that holds no images, shards or commits it did not write, and
``--new-run`` deletes only what the old job's commits and index name — an image object only
when it holds the bytes an ok row recorded (read and hashed first). Where the images go
(files or webdataset tars) is ``layout``'s; a commit is ``commits``', the merge ``index``'s, the claim and ``--new-run``'s clear
``claim``'s. Everything here works on any ``Storage`` and needs
no Ray.

May import: ``data``, ``manifest``, ``spec``, ``models``, ``storage``, ``errors``; pyarrow, PIL,
imagehash and duckdb (lazily)."""
