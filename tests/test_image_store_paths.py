"""ImageStore.is_safe (checked for every hit retrieve() returns) against resolving the whole path."""

from __future__ import annotations

import os

from mmrag.retrievers.kb.store import _RELPATH, ImageStore

SHA = "ab" + "0" * 62


def resolved_inside(root, relpath) -> bool:
    """The definition: a store path, and with every link followed, inside the root."""
    if not _RELPATH.fullmatch(relpath):
        return False
    real = os.path.realpath(root)
    return os.path.commonpath([real, os.path.realpath(os.path.join(real, relpath))]) == real


def test_is_safe_equals_full_resolution_with_links_anywhere(tmp_path):
    outside, store = tmp_path / "outside", tmp_path / "kb" / "images"
    (outside / "ab").mkdir(parents=True)
    (outside / "ab" / f"{SHA}.png").write_bytes(b"x")
    (store / "ab").mkdir(parents=True)
    (store / "ab" / f"{SHA}.png").write_bytes(b"inside")
    (store / "cd").symlink_to(outside / "ab")  # a folder linking out
    (store / "ab" / f"{'ab' + '1' * 62}.png").symlink_to(outside / "ab" / f"{SHA}.png")  # a file linking out
    (store / "ab" / f"{'ab' + '2' * 62}.png").symlink_to(store / "ab" / f"{SHA}.png")  # a file linking in
    (store / "ef").symlink_to(store / "ab")  # a folder linking in
    (outside / "ef").symlink_to(outside / "ab")  # the same, in the folder the root is re-pointed to below
    paths = [f"ab/{SHA}.png", f"ab/{'ab' + '1' * 62}.png", f"ab/{'ab' + '2' * 62}.png", f"cd/cd{'0' * 62}.png",
             f"ef/ef{'0' * 62}.png", f"ab/ab{'9' * 62}.png", f"99/99{'0' * 62}.jpg", "../outside/x.png", "/etc/passwd"]
    linked_root = tmp_path / "linked-images"
    linked_root.symlink_to(store)
    for root in (store, linked_root):
        images = ImageStore(root)
        want = [resolved_inside(root, p) for p in paths]
        for _ in range(2):  # the first call resolves the root, the second uses what it kept
            assert [images.is_safe(p) for p in paths] == want
        assert want.count(True) == 5  # in, linked in (file and folder), missing (file and folder)
    # the root re-pointed at another folder after a check: what was kept of the old root is not used
    images = ImageStore(linked_root)
    assert images.is_safe(f"cd/cd{'0' * 62}.png") is False
    linked_root.unlink()
    linked_root.symlink_to(outside)
    assert [images.is_safe(p) for p in paths] == [resolved_inside(linked_root, p) for p in paths]
    assert ImageStore(tmp_path / "no-store-yet").is_safe(f"ab/{SHA}.png")
