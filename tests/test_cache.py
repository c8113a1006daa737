import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dmlkit import cache


def test_key_is_order_independent_and_sensitive_to_values():
    a = cache.stage_key("s", {"x": 1, "y": {"p": 2, "q": 3}}, {"up": "k1"}, {"f": "h"})
    b = cache.stage_key("s", {"y": {"q": 3, "p": 2}, "x": 1}, {"up": "k1"}, {"f": "h"})
    assert a == b
    assert cache.stage_key("s", {"x": 2, "y": {"p": 2, "q": 3}}, {"up": "k1"}, {"f": "h"}) != a
    assert cache.stage_key("s", {"x": 1, "y": {"p": 2, "q": 3}}, {"up": "k2"}, {"f": "h"}) != a
    assert cache.stage_key("s", {"x": 1, "y": {"p": 2, "q": 3}}, {"up": "k1"}, {"f": "h2"}) != a


def test_file_fingerprint_changes_with_content(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,label\n1,a\n")
    first = cache.file_fingerprint(path)
    path.write_text("id,label\n1,b\n")
    assert cache.file_fingerprint(path) != first
    assert cache.file_fingerprint(tmp_path / "missing.csv") == "missing"


def test_writer_commits_atomically(tmp_path):
    final = tmp_path / "exp" / "stage" / "key"
    writer = cache.StageWriter(final, "stage", "key", {"a": 1})
    work = writer.begin()
    (work / "out.txt").write_text("x")
    assert not cache.is_complete(final) and not final.exists()
    art = writer.commit({"result": 2})
    assert cache.is_complete(final) and (final / "out.txt").read_text() == "x"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["a"] == 1 and manifest["result"] == 2 and "wall_time_s" in manifest
    assert art.path == final and not (tmp_path / "exp" / "stage" / "key.partial").exists()


def test_lock_refuses_a_second_holder(tmp_path):
    final = tmp_path / "s" / "k"
    with cache.stage_lock(final):
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(cache.__file__.rsplit("/dmlkit", 1)[0])!r})
            from pathlib import Path
            from dmlkit import cache
            try:
                with cache.stage_lock(Path({str(final)!r})):
                    print("acquired")
            except cache.CacheLockedError as exc:
                print("locked:", exc)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith("locked:") and "another run" in out


def test_killed_writer_leaves_nothing_complete(tmp_path):
    final = tmp_path / "s" / "k"
    code = textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {str(cache.__file__.rsplit("/dmlkit", 1)[0])!r})
        from pathlib import Path
        from dmlkit import cache
        writer = cache.StageWriter(Path({str(final)!r}), "s", "k", {{}})
        work = writer.begin()
        (work / "half.bin").write_bytes(b"x" * 100)
        print("writing", flush=True)
        time.sleep(60)
        writer.commit()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not cache.is_complete(final)
    # the next run clears the partial directory and completes
    writer = cache.StageWriter(final, "s", "k", {})
    work = writer.begin()
    assert not (work / "half.bin").exists()
    writer.commit()
    assert cache.is_complete(final)


@pytest.mark.parametrize("resumable", [True])
def test_resumable_writer_keeps_partial(tmp_path, resumable):
    final = tmp_path / "s" / "k"
    writer = cache.StageWriter(final, "s", "k", {}, resumable=resumable)
    (writer.begin() / "last.pt").write_text("checkpoint")
    again = cache.StageWriter(final, "s", "k", {}, resumable=resumable)
    assert (again.begin() / "last.pt").read_text() == "checkpoint"
    time.sleep(0.01)
