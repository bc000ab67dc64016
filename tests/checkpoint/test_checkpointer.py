"""Atomic checkpoints: a save that fails midway leaves the previous checkpoint and tag intact; the temp
file of a write killed midway is removed at the next start; only the newest periodic checkpoints are kept."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from up2.checkpoint import AtomicCheckpointer


def test_save_load_and_tag(tmp_path):
    model = torch.nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    restored = torch.nn.Linear(3, 2)
    extra = AtomicCheckpointer(restored, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    torch.testing.assert_close(restored.weight, model.weight)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert (tmp_path / "model_0000009.pth").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_failed_save_keeps_previous_files(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()

    def fail_midway(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_midway)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_final")
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


KILLED_WHILE_SAVING = """
import os, signal, sys
import torch
import up2  # noqa: F401
from up2.checkpoint import AtomicCheckpointer

real_save = torch.save


def save_then_die(obj, f, *args, **kwargs):
    f.write(b"the first bytes of a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the write


torch.save = save_then_die
AtomicCheckpointer(torch.nn.Linear(3, 2), save_dir=sys.argv[1]).save("model_0000004")
"""


def test_temp_file_of_a_killed_write_is_removed_at_the_next_start(tmp_path):
    from up2.checkpoint.atomic_files import remove_stale_temp_files

    checkpointer = AtomicCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path))
    checkpointer.save("model_0000001")
    result = subprocess.run([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path)], capture_output=True,
                            timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    stale = [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    assert len(stale) == 1 and stale[0].endswith("model_0000004.pth"), os.listdir(tmp_path)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"  # the killed write changed nothing

    assert remove_stale_temp_files(str(tmp_path)) == [str(tmp_path / stale[0])]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert remove_stale_temp_files(str(tmp_path / "absent")) == []


def test_only_the_newest_periodic_checkpoints_are_kept(tmp_path):
    from up2.checkpoint.checkpointer import prune_periodic_checkpoints

    checkpointer = AtomicCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path))
    for name in ("model_0000009", "model_0000019", "model_final", "model_0000029", "model_0000039"):
        checkpointer.save(name)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")  # e.g. resumed from an older one: kept
    (tmp_path / "notes.pth").write_bytes(b"")  # not a periodic checkpoint: kept
    removed = prune_periodic_checkpoints(str(tmp_path), 2)
    assert removed == [str(tmp_path / "model_0000019.pth")]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == [
        "model_0000009.pth", "model_0000029.pth", "model_0000039.pth", "model_final.pth", "notes.pth"]
    assert prune_periodic_checkpoints(str(tmp_path), 0) == []  # 0 keeps everything
