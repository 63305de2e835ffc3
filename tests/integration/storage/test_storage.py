"""Storage layer: LocalStorage and S3Storage (against a real moto server) behind the same tests."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

from integration.faults import TESTS, FaultInjector, fault_env, install_from_env, read_counts, summarize
from sdbatch.models.cache import MODEL_MARKER, fetch_model_dir
from sdbatch.storage import s3_client as st
from sdbatch.storage.base import NotFound, PutResult, Storage, StorageConfigError, StorageError
from sdbatch.storage.local import LocalStorage
from sdbatch.storage.open import open_storage, read_uri
from sdbatch.storage.s3 import S3Storage

SECRET = os.environ.get("AWS_SECRET_ACCESS_KEY", "testing")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(autouse=True)
def _fresh_clients():
    """Each test gets fresh cached clients (botocore's retry quota is per client)."""
    st.clear_client_cache()
    yield
    st.clear_client_cache()


def _raw_client(endpoint):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- protocol behaviour, both backends --------------------------------------------------------


def test_put_new_create_once_and_adopt(store):
    assert isinstance(store, Storage)
    r1 = store.put_new("images/00000/a.png", b"first")
    assert r1 == PutResult(created=True, sha256=sha(b"first"), size=5)
    # same bytes again: adopted
    r2 = store.put_new("images/00000/a.png", b"first")
    assert r2 == PutResult(created=False, sha256=sha(b"first"), size=5)
    # different bytes: adopted, the ORIGINAL stays
    r3 = store.put_new("images/00000/a.png", b"zombie write, longer")
    assert r3 == PutResult(created=False, sha256=sha(b"first"), size=5)
    assert store.get("images/00000/a.png") == b"first"
    assert store.list("images/") == ["images/00000/a.png"]  # no temp files visible


def test_put_new_concurrent_threads_exactly_one_created(store):
    n = 8
    barrier = threading.Barrier(n)
    payloads = [f"writer {i}".encode() * (i + 1) for i in range(n)]

    def write(i):
        barrier.wait()
        return store.put_new("images/race.png", payloads[i])

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(write, range(n)))
    created = [i for i, r in enumerate(results) if r.created]
    assert len(created) == 1
    stored = store.get("images/race.png")
    assert stored == payloads[created[0]]
    assert {r.sha256 for r in results} == {sha(stored)}
    assert {r.size for r in results} == {len(stored)}


def test_replace_if_swaps_only_the_tagged_object(store):
    store.put("_sdbatch/lock.json", b"first")
    data, tag = store.get_tagged("_sdbatch/lock.json")
    assert data == b"first"
    new_tag = store.replace_if("_sdbatch/lock.json", b"second", tag)
    assert new_tag is not None and store.get_tagged("_sdbatch/lock.json") == (b"second", new_tag)
    assert store.replace_if("_sdbatch/lock.json", b"stale writer", tag) is None  # tag of "first": refused
    assert store.get("_sdbatch/lock.json") == b"second"
    assert store.replace_if("_sdbatch/absent.json", b"x", tag) is None and not store.exists("_sdbatch/absent.json")
    assert store.list("_sdbatch/") == ["_sdbatch/lock.json"]  # the local lock sidecar is not listed


def test_replace_if_concurrent_threads_exactly_one_wins(store):
    n = 8
    store.put("_sdbatch/lock.json", b"expired lease")
    _, tag = store.get_tagged("_sdbatch/lock.json")
    barrier = threading.Barrier(n)

    def take_over(i):
        barrier.wait()
        return store.replace_if("_sdbatch/lock.json", f"driver {i}".encode(), tag)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(take_over, range(n)))
    winners = [i for i, r in enumerate(results) if r is not None]
    assert len(winners) == 1
    assert store.get_tagged("_sdbatch/lock.json") == (f"driver {winners[0]}".encode(), results[winners[0]])


def test_replace_if_read_modify_write_loses_no_update_and_leaves_no_sidecar(tmp_path):
    # threads counting up through compare-and-swap: a writer let in beside another would lose a count
    store = LocalStorage(tmp_path / "out")
    store.put("_sdbatch/lock.json", b"0")
    threads, each = 8, 25

    def count_up(_):
        for _ in range(each):
            while True:
                data, tag = store.get_tagged("_sdbatch/lock.json")
                if store.replace_if("_sdbatch/lock.json", str(int(data) + 1).encode(), tag) is not None:
                    break

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(count_up, range(threads)))
    assert store.get("_sdbatch/lock.json") == str(threads * each).encode()
    assert sorted(p.name for p in (tmp_path / "out" / "_sdbatch").iterdir()) == ["lock.json"]


def test_replace_if_lost_response_is_recognised_as_own_write(s3_bucket):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}", endpoint_url=endpoint)
    s.put("lock.json", b"old")
    _, tag = s.get_tagged("lock.json")
    with FaultInjector({"PutObject": {"first": 1, "errors": ["lost"]}}) as inj:
        new_tag = s.replace_if("lock.json", b"mine", tag)
    # the first PUT landed, botocore's retry got 412 (the ETag had changed): it was our write
    assert inj.faults() == 1 and new_tag is not None and s.get_tagged("lock.json") == (b"mine", new_tag)


def test_put_get_exists_list_delete(store):
    assert not store.exists("metadata/00000.parquet")
    with pytest.raises(NotFound):
        store.get("metadata/00000.parquet")
    store.put("_sdbatch/progress.json", b'{"done": 1}')
    store.put("_sdbatch/progress.json", b'{"done": 2}')  # overwrite
    assert store.get("_sdbatch/progress.json") == b'{"done": 2}'
    for k in ["metadata/00001.parquet", "metadata/00000.parquet", "images/00000/x.png", "index.parquet"]:
        store.put_new(k, k.encode())
    assert store.exists("metadata/00000.parquet")
    assert not store.exists("metadata")  # a "directory" is not an object
    assert store.list("metadata/") == ["metadata/00000.parquet", "metadata/00001.parquet"]
    assert store.list("metadata/00001") == ["metadata/00001.parquet"]
    assert store.list("meta") == ["metadata/00000.parquet", "metadata/00001.parquet"]
    assert store.list("nothing/") == []
    assert store.list("") == sorted(
        ["_sdbatch/progress.json", "index.parquet", "images/00000/x.png",
         "metadata/00000.parquet", "metadata/00001.parquet"]
    )
    store.delete("metadata/00001.parquet")
    store.delete("metadata/00001.parquet")  # missing: no error
    assert store.list("metadata/") == ["metadata/00000.parquet"]
    assert not store.exists("metadata/00001.parquet")


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "../x", "a//b", "./a", "a/"])
def test_bad_keys_refused(store, bad):
    with pytest.raises(StorageError):
        store.put_new(bad, b"x")


def test_check_access_ok(store):
    store.check_access()
    assert [k for k in store.list("") if k.startswith("_sdbatch/probe")] == []
    if isinstance(store, LocalStorage):  # a new output directory is left empty
        assert list(store.root.iterdir()) == []


# ---- local specifics --------------------------------------------------------------------------


def test_local_not_created_on_open_and_check_access_errors(tmp_path):
    s = open_storage(str(tmp_path / "new" / "out"))
    assert isinstance(s, LocalStorage) and not (tmp_path / "new").exists()
    assert s.list("") == [] and not s.exists("x")
    s.put_new("a/b.png", b"1")
    assert (tmp_path / "new" / "out" / "a" / "b.png").read_bytes() == b"1"
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(StorageConfigError, match="afile"):
        LocalStorage(tmp_path / "afile" / "out").check_access()
    assert open_storage(f"file://{tmp_path}/x").root == tmp_path / "x"


# ---- S3 specifics -----------------------------------------------------------------------------


def test_s3_keys_are_under_prefix(s3_bucket):
    endpoint, bucket = s3_bucket
    s = open_storage(f"s3://{bucket}/runs/job1/", endpoint_url=endpoint)
    assert isinstance(s, S3Storage) and s.url == f"s3://{bucket}/runs/job1"
    s.put_new("images/a.png", b"x")
    keys = [o["Key"] for o in _raw_client(endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["runs/job1/images/a.png"]
    other = S3Storage(f"s3://{bucket}/runs/job10", endpoint_url=endpoint)  # sibling prefix
    other.put_new("images/b.png", b"y")
    assert s.list("") == ["images/a.png"]


def test_list_sizes_and_list_folder(store):
    """Issue 23 (verify): keys and sizes under a prefix, and a delimiter listing of a folder —
    its keys and sub-folders, in key order; a prefix shared by two names lists both."""
    for key, data in [("images/00000/a.png", b"aa"), ("images/00000/b.png", b"bbb"), ("images/000001/c.png", b"c"),
                      ("images/stray.png", b"ssss"), ("shards/00000.tar", b"t" * 5), ("shards/00000-retry-1.tar", b"r")]:
        store.put(key, data)
    assert list(store.list_sizes("images/00000/")) == [("images/00000/a.png", 2), ("images/00000/b.png", 3)]
    assert list(store.list_sizes("shards/00000")) == [("shards/00000-retry-1.tar", 1), ("shards/00000.tar", 5)]
    assert list(store.list_sizes("nothing/")) == []
    assert list(store.list_folder("images/")) == ["images/00000/", "images/000001/", "images/stray.png"]
    assert list(store.list_folder("")) == ["images/", "shards/"]
    assert list(store.list_folder("nothing/")) == []


def test_s3_list_and_delete_many_page_over_1000_keys(s3_bucket):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}/p", endpoint_url=endpoint, max_pool_connections=8)
    keys = [f"metadata/{i:05d}.parquet" for i in range(1005)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s.put(k, b""), keys))
    s.put("keep.txt", b"not listed below metadata/")
    with FaultInjector({"ListObjectsV2": {"fraction": 0.0}, "DeleteObjects": {"fraction": 0.0}}) as counter:
        listed = s.list("metadata/")  # (fraction 0: counts requests only)
        sized = [key for key, _ in s.list_sizes("metadata/")]  # a page at a time too
        s.delete_many(listed)
    assert listed == sized == keys
    assert counter.requests("ListObjectsV2") == 4 and counter.requests("DeleteObjects") == 2
    assert s.list("") == ["keep.txt"]


def test_open_storage_bad_urls():
    for url in ["gs://bucket/x", "s3://", "s3:///prefix", "s3://Bad_Bucket/x", "s3://ab/x",
                "s3://user:pw@bucket/x"]:
        with pytest.raises(StorageConfigError):
            open_storage(url)
    with pytest.raises(StorageConfigError) as ei:
        open_storage("s3://user:pw@bucket/x")
    assert "pw" not in str(ei.value) and "user" not in str(ei.value)


def test_bad_endpoint_urls(s3_server):
    for ep in ["not a url", "ftp://127.0.0.1:1", "http://"]:
        with pytest.raises(StorageConfigError, match="invalid S3 endpoint"):
            S3Storage("s3://some-bucket/x", endpoint_url=ep).check_access()
    with pytest.raises(StorageConfigError, match="S3 endpoint .* 'ftp://127.0.0.1:1' carries credentials") as ei:
        S3Storage("s3://some-bucket/x", endpoint_url="ftp://u:pw@127.0.0.1:1")
    assert "pw" not in str(ei.value)


def test_check_access_missing_bucket(s3_server, caplog):
    caplog.set_level(logging.DEBUG, logger="sdbatch.storage")
    s = S3Storage("s3://no-such-bucket-sdbatch/out", endpoint_url=s3_server)
    with pytest.raises(StorageConfigError) as ei:
        s.check_access()
    msg = str(ei.value)
    assert "no-such-bucket-sdbatch" in msg and "does not exist" in msg
    assert s3_server in msg
    assert SECRET not in msg and SECRET not in caplog.text
    assert not ei.value.transient
    # data operations on a missing bucket are config errors too
    with pytest.raises(StorageConfigError, match="no-such-bucket-sdbatch"):
        s.put_new("a.png", b"x")


def test_check_access_unreachable_endpoint(s3_server, caplog):
    caplog.set_level(logging.DEBUG, logger="sdbatch.storage")
    port = _free_port()
    s = S3Storage("s3://some-bucket/out", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(StorageConfigError) as ei:
        s.check_access()
    msg = str(ei.value)
    assert f"127.0.0.1:{port}" in msg and "some-bucket" in msg and "cannot reach" in msg
    assert SECRET not in msg and SECRET not in caplog.text  # an endpoint with user-info is refused: test_inputs.py
    # mid-job, the same failure is transient (an outage, not a config mistake)
    with pytest.raises(StorageError) as ei2:
        s.get("a.png")
    assert ei2.value.transient and not isinstance(ei2.value, StorageConfigError)


def test_check_access_detects_store_ignoring_if_none_match(s3_bucket):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}/out", endpoint_url=endpoint)

    def strip(request, **kw):  # an S3-compatible store that ignores the header behaves like this
        if "If-None-Match" in request.headers:
            del request.headers["If-None-Match"]

    unregister = st.register_client_hook(lambda c: c.meta.events.register("before-send.s3.PutObject", strip))
    try:
        with pytest.raises(StorageConfigError, match="If-None-Match") as ei:
            s.check_access()
        assert bucket in str(ei.value)
    finally:
        unregister()
    st.clear_client_cache()
    s.check_access()
    assert s.list("") == []  # the probe was removed


def test_check_access_warns_when_the_store_ignores_if_match(s3_bucket, caplog):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}/out", endpoint_url=endpoint)
    with caplog.at_level(logging.WARNING, logger="sdbatch.storage"):
        s.check_access()
    assert "If-Match" not in caplog.text  # moto honours it

    def strip(request, **kw):  # a store without compare-and-swap behaves like this
        if "If-Match" in request.headers:
            del request.headers["If-Match"]

    unregister = st.register_client_hook(lambda c: c.meta.events.register("before-send.s3.PutObject", strip))
    try:
        with caplog.at_level(logging.WARNING, logger="sdbatch.storage"):
            s.check_access()  # a warning, not an error: create-once still holds
    finally:
        unregister()
        st.clear_client_cache()
    assert "does not honour If-Match" in caplog.text and bucket in caplog.text
    assert s.list("") == []  # the probe was removed


def test_error_classification():
    from botocore.exceptions import ClientError

    def ce(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    def tr(e):
        return st._translate(e, what="put_object k", bucket="bkt", endpoint="http://127.0.0.1:9")

    for code, status in [("AccessDenied", 403), ("InvalidAccessKeyId", 403), ("SignatureDoesNotMatch", 403),
                         ("NoSuchBucket", 404)]:
        err = tr(ce(code, status))
        assert isinstance(err, StorageConfigError) and not err.transient and "bkt" in str(err)
    for code, status in [("SlowDown", 503), ("InternalError", 500), ("ServiceUnavailable", 503),
                         ("RequestTimeout", 400)]:
        err = tr(ce(code, status))
        assert type(err) is StorageError and err.transient
    assert isinstance(tr(ce("NoSuchKey", 404)), NotFound)
    assert isinstance(tr(ce("NotImplemented", 501)), StorageConfigError)
    assert not tr(ce("InvalidArgument", 400)).transient


# ---- fault injection --------------------------------------------------------------------------


def _put_all(s, items, threads=4, attempts=3):
    """Like the worker's upload pool: put_new with a few caller-level retries on transient errors."""
    caller_retries = []

    def one(kv):
        k, v = kv
        for i in range(attempts):
            try:
                return s.put_new(k, v)
            except StorageError as e:
                if not e.transient or i == attempts - 1:
                    raise
                caller_retries.append(k)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, items)), caller_retries


def test_faults_on_fraction_of_puts_every_object_stored_once(s3_bucket, capsys):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}/run", endpoint_url=endpoint)
    items = [(f"images/00000/{i:04d}.png", os.urandom(2000)) for i in range(80)]
    rules = {"PutObject": {"fraction": 0.25, "errors": ["503", "500", "reset", "timeout", "lost"], "seed": 1}}
    with FaultInjector(rules) as inj:
        results, caller_retries = _put_all(s, items)
    for (_, v), r in zip(items, results):
        assert r.sha256 == sha(v) and r.size == len(v)  # created, or adopted our own lost write
    assert s.list("images/") == sorted(k for k, _ in items)
    for k, v in items:
        assert s.get(k) == v
    assert inj.faults("PutObject") >= 10
    with capsys.disabled():
        print(f"\n[faults] {inj.summary()}; caller-level retries: {len(caller_retries)}")


def test_lost_response_is_adopted_as_own_write(s3_bucket):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}", endpoint_url=endpoint)
    with FaultInjector({"PutObject": {"first": 1, "errors": ["lost"]}}) as inj:
        r = s.put_new("a.png", b"payload")
    assert inj.faults() == 1
    # the first PUT landed; botocore's retry got 412; we adopted our own bytes
    assert r == PutResult(created=False, sha256=sha(b"payload"), size=7)


def test_409_conflict_is_retried(s3_bucket):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}", endpoint_url=endpoint)
    with FaultInjector({"PutObject": {"first": 2, "errors": ["409"]}}) as inj:
        r = s.put_new("a.png", b"x")
    assert r.created and inj.faults() == 2 and s.get("a.png") == b"x"


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_outage_longer_than_retry_budget_is_transient(s3_bucket, kind):
    endpoint, bucket = s3_bucket
    s = S3Storage(f"s3://{bucket}", endpoint_url=endpoint, max_attempts=2)
    with FaultInjector({"*": {"errors": [kind], "outage": {"after": 0, "duration": 600}}}) as inj:
        for op in (lambda: s.put_new("a.png", b"x"), lambda: s.get("a.png"), lambda: s.list("")):
            with pytest.raises(StorageError) as ei:
                op()
            assert ei.value.transient and not isinstance(ei.value, (StorageConfigError, NotFound))
            assert bucket in str(ei.value)
    assert inj.faults() == 6, inj.summary()  # 3 operations x 2 attempts
    assert s.put_new("a.png", b"x").created  # after the outage: nothing half-written


def test_faults_reach_ray_workers_through_the_setup_hook(ray_address, s3_bucket, tmp_path):
    """How Ray workers get faults: a driver whose job runtime_env runs faults.setup_process in
    each worker process (Ray's worker_process_setup_hook); counts come back through files."""
    endpoint, bucket = s3_bucket
    counts = tmp_path / "counts"
    env = {**os.environ, **fault_env({"PutObject": {"fraction": 0.3, "errors": ["503", "reset"], "seed": 3}},
                                     counts_dir=counts)}
    code = f"""
import ray
from integration import faults
from sdbatch.storage.s3 import S3Storage
ray.init(address={ray_address!r}, runtime_env=faults.worker_runtime_env())

@ray.remote(num_cpus=0)
def put_twenty():
    s = S3Storage("s3://{bucket}/env", endpoint_url="{endpoint}")
    return sum(bool(s.put_new(f"k{{i}}", b"v%d" % i).sha256) for i in range(20))

assert ray.get(put_twenty.remote(), timeout=120) == 20
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=TESTS,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    c = read_counts(counts)
    assert c["PutObject"].get("503", 0) + c["PutObject"].get("reset", 0) >= 1, c
    print(f"[faults in a Ray worker] {summarize(c)}")
    assert S3Storage(f"s3://{bucket}/env", endpoint_url=endpoint).list("") == sorted(f"k{i}" for i in range(20))


def test_faults_from_the_environment_in_this_process(s3_bucket, tmp_path, monkeypatch):
    endpoint, bucket = s3_bucket
    counts = tmp_path / "counts"
    for k, v in fault_env({"PutObject": {"first": 2, "errors": ["500"]}}, counts_dir=counts).items():
        monkeypatch.setenv(k, v)
    injector = install_from_env()
    s = S3Storage(f"s3://{bucket}", endpoint_url=endpoint)
    assert s.put_new("a", b"1").created
    assert read_counts(counts)["PutObject"]["500"] == 2
    injector.uninstall()
    st.clear_client_cache()
    with FaultInjector({"*": {"fraction": 0.0}}) as counter:
        assert s.put_new("b", b"2").created
    assert counter.requests("PutObject") == 1  # the injector is gone once uninstalled
    assert read_counts(counts)["PutObject"]["500"] == 2
    monkeypatch.setenv("SDBATCH_TEST_S3_CLIENT_HOOK", f"{TESTS / 'integration' / 'faults.py'}:install_from_env")
    st.clear_client_cache()
    with FaultInjector({"*": {"fraction": 0.0}}) as counter:
        assert s.put_new("c", b"3").created
    assert counter.requests("PutObject") == 1 and read_counts(counts)["PutObject"]["500"] == 2  # no variable imports code


# ---- read_uri / fetch_model_dir ---------------------------------------------------------------


def test_read_uri_local_and_s3(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    p = tmp_path / "init.png"
    p.write_bytes(b"local bytes")
    assert read_uri(str(p)) == b"local bytes"
    assert read_uri(p.as_uri()) == b"local bytes"
    _raw_client(endpoint).put_object(Bucket=bucket, Key="inputs/init.png", Body=b"s3 bytes")
    assert read_uri(f"s3://{bucket}/inputs/init.png", endpoint_url=endpoint) == b"s3 bytes"
    with pytest.raises(NotFound):
        read_uri(str(tmp_path / "missing.png"))
    with pytest.raises(NotFound, match="missing.png"):
        read_uri(f"s3://{bucket}/inputs/missing.png", endpoint_url=endpoint)
    with pytest.raises(StorageConfigError, match="no-such-bucket-sdbatch"):
        read_uri("s3://no-such-bucket-sdbatch/x.png", endpoint_url=endpoint)


MODEL_FILES = {
    "model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
    "unet/config.json": b'{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": os.urandom(50_000),
    "vae/config.json": b"{}",
    "vae/diffusion_pytorch_model.safetensors": os.urandom(30_000),
    "tokenizer/vocab.json": b'{"a": 0}',
}


def _upload_model(endpoint, bucket, prefix, files):
    c = _raw_client(endpoint)
    for rel, data in files.items():
        c.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


def test_fetch_model_dir_downloads_once(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    _upload_model(endpoint, bucket, "models/sd", MODEL_FILES)
    uri = f"s3://{bucket}/models/sd"
    cache = tmp_path / "cache"
    with FaultInjector({"*": {"fraction": 0.0}}) as counter:
        with ThreadPoolExecutor(4) as pool:  # concurrent actors on one node
            got = list(pool.map(lambda _: fetch_model_dir(uri, cache_dir=cache, endpoint_url=endpoint), range(4)))
    assert len(set(got)) == 1
    d, pin = got[0]
    assert pin.startswith("s3-etags:")
    for rel, data in MODEL_FILES.items():
        assert (d / rel).read_bytes() == data
    assert counter.requests("GetObject") == len(MODEL_FILES)  # downloaded once
    assert (d / MODEL_MARKER).exists()
    with FaultInjector({"*": {"fraction": 0.0}}) as counter2:
        assert fetch_model_dir(uri, pin=pin, cache_dir=cache, endpoint_url=endpoint) == (d, pin)
    assert counter2.requests() == 0  # cached under its pin: no S3 request at all
    # a damaged cache (size changed) is repaired
    (d / "vae/config.json").write_bytes(b"{ }")
    with FaultInjector({"*": {"fraction": 0.0}}) as counter3:
        assert fetch_model_dir(uri, pin=pin, cache_dir=cache, endpoint_url=endpoint) == (d, pin)
    assert counter3.requests("GetObject") == 1
    assert (d / "vae/config.json").read_bytes() == b"{}"


def test_fetch_model_dir_never_serves_replaced_weights_from_the_cache(s3_bucket, tmp_path):
    """Finding 6: the cache is keyed by the objects' ETags, so a file replaced by one of the
    same size (which a size check cannot see) is downloaded again, under a new pin."""
    endpoint, bucket = s3_bucket
    _upload_model(endpoint, bucket, "models/sd", MODEL_FILES)
    uri = f"s3://{bucket}/models/sd"
    first, pin = fetch_model_dir(uri, cache_dir=tmp_path, endpoint_url=endpoint)
    replaced = MODEL_FILES["vae/config.json"].replace(b"{", b"[")
    assert len(replaced) == len(MODEL_FILES["vae/config.json"]) and replaced != MODEL_FILES["vae/config.json"]
    _upload_model(endpoint, bucket, "models/sd", {"vae/config.json": replaced})
    second, new_pin = fetch_model_dir(uri, cache_dir=tmp_path, endpoint_url=endpoint)
    assert new_pin != pin and second != first
    assert (second / "vae/config.json").read_bytes() == replaced


def test_fetch_model_dir_missing(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    with pytest.raises(NotFound):
        fetch_model_dir(f"s3://{bucket}/models/none", cache_dir=tmp_path, endpoint_url=endpoint)
