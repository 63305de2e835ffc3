"""storage.locations: the one place that reads a location's scheme."""

import pytest

from sdbatch.storage.locations import has_scheme, is_remote, is_s3, local_path, s3_bucket, s3_path, url_scheme


@pytest.mark.parametrize("location, remote, s3, scheme", [
    ("s3://bucket/key/x.parquet", True, True, "s3"),
    ("s3://bucket", True, True, "s3"),
    ("file:///data/m.parquet", False, False, "file"),
    ("/data/m.parquet", False, False, None),
    ("rel/m.parquet", False, False, None),
    ("gs://bucket/m.parquet", True, False, "gs"),   # remote, and refused by whoever opens it
])
def test_each_kind_of_location_is_told_apart(location, remote, s3, scheme):
    assert (is_remote(location), is_s3(location), url_scheme(location)) == (remote, s3, scheme)
    assert has_scheme(location) == (scheme is not None)


def test_a_file_url_gives_its_path_and_a_path_stays_as_it_is():
    assert local_path("file:///data/m.parquet") == "/data/m.parquet"
    assert local_path("rel/m.parquet") == "rel/m.parquet"
    assert local_path("s3://b/k") == "s3://b/k"


def test_an_s3_uri_splits_into_bucket_and_path():
    assert (s3_bucket("s3://bucket/a/b.png"), s3_path("s3://bucket/a/b.png")) == ("bucket", "bucket/a/b.png")
    assert s3_bucket("s3://bucket") == "bucket"
