"""Read-only mappings of an engine's cache files are handed back to the kernel without changing a byte."""

import mmap
import sys

import pytest

from openldm.engines.pages import drop_mapped_pages, read_only_mappings

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise on /proc/self/maps: Linux")


def resident_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                current = len(head) == 6 and head[5] == str(path)
            elif current and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_only_read_only_shared_mappings_under_the_folder_are_listed(tmp_path):
    maps = tmp_path / "maps"
    inside, other = tmp_path / "cache", tmp_path / "cache-other"
    maps.write_text(
        f"1000-3000 r--s 00000000 00:01 1 {inside}/compiled/a.blob\n"
        f"4000-5000 r--p 00000000 00:01 2 {inside}/model.bin\n"
        f"6000-7000 rw-s 00000000 00:01 3 {inside}/model.bin\n"
        f"8000-9000 r--s 00000000 00:01 4 {other}/b.blob\n"
        "a000-b000 rw-p 00000000 00:00 0 \n"
        f"c000-d000 r--s 00000000 00:01 5 {inside}/x.blob (deleted)\n")
    assert read_only_mappings(inside, maps) == [(0x1000, 0x3000), (0xC000, 0xD000)]


@linux
def test_dropped_pages_stop_counting_and_read_back_the_same(tmp_path):
    folder = tmp_path / "entry"
    folder.mkdir()
    blob = folder / "program.blob"
    data = bytes(range(256)) * (4 << 12)  # 4 MiB
    blob.write_bytes(data)
    with blob.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        assert view[:] == data  # every page touched
        assert resident_kib(blob.resolve()) >= 4000
        assert drop_mapped_pages(folder) >= len(data)
        assert resident_kib(blob.resolve()) < 100
        assert view[:] == data  # read again from the file


def test_without_proc_nothing_is_dropped_and_nothing_fails(tmp_path, monkeypatch):
    from openldm.engines import pages

    def unreadable(folder, maps=None):
        raise FileNotFoundError("/proc/self/maps")

    monkeypatch.setattr(pages, "read_only_mappings", unreadable)
    with pages.dropping_mapped_pages(tmp_path, every=0.01):
        pass
    assert pages.drop_mapped_pages(tmp_path) == 0
