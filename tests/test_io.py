"""distily.io: atomic writes are durable (flushed to disk around the rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distily.io import atomic_path, write_json_atomic


def test_atomic_path_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, Path.rename

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)

    def rename(self, target):
        events.append(("rename", str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "rename", rename)
    target = tmp_path / "out" / "manifest.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    (tmp_name, tmp_file), renamed, (_, parent) = events
    assert tmp_name == "fsync" and tmp_file.endswith("/manifest.json") and tmp_file != str(target)
    assert renamed == ("rename", str(target)) and parent == str(target.parent)

    events.clear()
    folder = tmp_path / "out" / "export"
    with atomic_path(folder) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "a.txt").write_text("a")
        (tmp / "sub" / "b.txt").write_text("b")
    flushed = [path for kind, path in events[: events.index(("rename", str(folder)))] if kind == "fsync"]
    assert {Path(p).name for p in flushed} >= {"a.txt", "b.txt", "sub", "export"}
    assert events[-1] == ("fsync", str(folder.parent))
    assert (folder / "sub" / "b.txt").read_text() == "b"
