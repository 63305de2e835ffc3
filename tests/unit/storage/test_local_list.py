"""``LocalStorage.list``: the keys under a prefix, read with one ``scandir`` per folder walked."""

from __future__ import annotations

import pytest

from sdbatch.storage.base import TMP_MARK, StorageConfigError
from sdbatch.storage.local import LocalStorage


@pytest.fixture
def out(tmp_path):
    root = tmp_path / "out"
    (root / "images" / "00000").mkdir(parents=True)
    for key in ["images/00000/a.png", "images/00000/b.png", f"images/00000/.c.png{TMP_MARK}1", "images/ab.json", "top"]:
        (root / key).write_bytes(b"x")
    (root / "images" / "again").symlink_to(root / "images" / "00000", target_is_directory=True)
    (root / "images" / "top-link").symlink_to(root / "top")
    return root


@pytest.mark.parametrize(
    "prefix, keys",
    [
        ("", ["images/00000/a.png", "images/00000/b.png", "images/ab.json", "images/top-link", "top"]),
        ("images/0", ["images/00000/a.png", "images/00000/b.png"]),
        ("images/a", ["images/ab.json"]),  # a link to a folder inside OUT is neither a key nor walked into
        ("images/00000/", ["images/00000/a.png", "images/00000/b.png"]),  # temporary files are no keys
        ("nothing", []),
    ],
)
def test_keys_under_a_prefix(out, prefix, keys):
    assert LocalStorage(out).list(prefix) == keys


def test_a_link_out_of_out_in_a_folder_read_is_refused_whatever_the_prefix(out, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (out / "images" / "zz").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    storage = LocalStorage(out)
    for prefix in ["images/", "images/ab"]:  # both read images/, where the link is
        with pytest.raises(StorageConfigError, match="outside the output directory"):
            storage.list(prefix)
    assert storage.list("images/00000/a") == ["images/00000/a.png"]  # reads images/00000/ only
