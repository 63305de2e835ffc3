"""Both output layouts through the one interface: store → finish → read back → check, with
adoption of an earlier attempt's identical bytes, a foreign object at a row's key, and
corrupt, truncated and missing objects. Real local storage, no Ray."""

from __future__ import annotations

import pytest

from sdbatch.output.layout import FilesLayout, WebdatasetLayout, layout_for, tar_members
from sdbatch.spec import OutputSpec
from sdbatch.storage.base import NotFound, StorageError
from sdbatch.storage.local import LocalStorage

IMAGES = {"r1": b"first image", "r.2": b"second image, longer"}  # a dot in an id: escaped in tars


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def store(layout, shard="00000", unit=None, images=IMAGES):
    writer = layout.writer(shard, unit)
    for rid, data in images.items():
        writer.add(rid, data, sha(data), {"id": rid})
    return writer.finish(list(images))


def entries(placed, images=IMAGES):
    return [{"id": rid, "key": placed[rid].key, "bytes": len(data), "sha256": sha(data)} for rid, data in images.items()]


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_store_finish_read_back_check(fmt, tmp_path):
    storage = LocalStorage(tmp_path / "out")
    layout = layout_for(storage, OutputSpec(format=fmt, image_format="png"))
    assert type(layout) is {"files": FilesLayout, "webdataset": WebdatasetLayout}[fmt]
    placed = store(layout)
    expected = ({"r1": "images/00000/r1.png", "r.2": "images/00000/r.2.png"} if fmt == "files" else
                {"r1": "shards/00000.tar#r1.png", "r.2": "shards/00000.tar#r%2E2.png"})
    assert {rid: p.key for rid, p in placed.items()} == expected
    assert all(p.created and p.error is None for p in placed.values())
    assert {rid: layout.read(p.key) for rid, p in placed.items()} == IMAGES
    objects = set(expected.values()) if fmt == "files" else {"shards/00000.tar"}
    assert layout.objects(list(expected.values())) == objects == set(storage.list("images/") + storage.list("shards/"))
    checked = layout.check(entries(placed))
    assert [e["id"] for e in checked.good] == list(IMAGES) and not (checked.missing or checked.mismatched)
    assert checked.orphan_members == []

    # a retried attempt produces the same bytes: adopted, not created, no error
    again = store(layout)
    assert [(p.key, p.created, p.error) for p in again.values()] == [(p.key, False, None) for p in placed.values()]

    # another object at the row's key (files) or the shard's tar (webdataset) is not adopted
    foreign = store(layout, images={"r1": b"other bytes"})
    assert foreign["r1"].created is False and "already holds an object that is not this row's image" in foreign["r1"].error


def test_files_check_finds_missing_and_changed_objects(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    layout = FilesLayout(storage, "png")
    placed = store(layout)
    storage.delete(placed["r1"].key)
    storage.put(placed["r.2"].key, b"second image, LONGER")  # same size, other bytes
    checked = layout.check(entries(placed))
    assert checked.good == [] and checked.missing == [("r1", "images/00000/r1.png")]
    assert checked.mismatched == [("r.2", "images/00000/r.2.png", "sha256 differs")]
    with pytest.raises(NotFound):
        layout.read(placed["r1"].key)


def test_webdataset_check_finds_corrupt_tars_absent_members_and_orphans(tmp_path):
    storage = LocalStorage(tmp_path / "out")
    layout = WebdatasetLayout(storage, "png")
    placed = store(layout)
    retried = store(layout, unit="00000-retry-1a2b3c4d", images={"r1": IMAGES["r1"]})
    assert retried["r1"].key == "shards/00000-retry-1a2b3c4d.tar#r1.png"
    assert set(tar_members(storage.get("shards/00000.tar"))) == {"r1.png", "r1.json", "r%2E2.png", "r%2E2.json"}

    # an index naming only r1: r.2's members are orphans
    checked = layout.check(entries(placed, {"r1": IMAGES["r1"]}))
    assert [e["id"] for e in checked.good] == ["r1"]
    assert checked.orphan_members == ["shards/00000.tar#r%2E2.json", "shards/00000.tar#r%2E2.png"]

    # a member the index names that the tar lacks, and a tar that is not one
    ghost = {"id": "r9", "key": "shards/00000.tar#r9.png", "bytes": 1, "sha256": "0" * 64}
    assert WebdatasetLayout(storage, "png").check([ghost]).missing == [("r9", ghost["key"])]
    with pytest.raises(NotFound, match="has no member r9.png"):
        WebdatasetLayout(storage, "png").read(ghost["key"])
    storage.put("shards/00000.tar", b"\x00garbage" * 100)
    fresh = WebdatasetLayout(storage, "png")  # a layout reads each tar once: a new one sees the change
    checked = fresh.check(entries(placed))
    assert [m[:2] for m in checked.mismatched] == [("r1", placed["r1"].key), ("r.2", placed["r.2"].key)]
    assert all("not a readable tar" in m[2] for m in checked.mismatched)
    with pytest.raises(StorageError, match="is not a readable tar"):
        fresh.read(placed["r1"].key)
    storage.delete("shards/00000.tar")
    assert len(WebdatasetLayout(storage, "png").check(entries(placed)).missing) == 2
