"""Atomic checkpoints: a save that fails midway leaves the previous checkpoint and tag intact."""
import os

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
