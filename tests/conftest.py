"""Shared pytest fixtures. ``import up2`` first: it applies the Detectron2 compatibility fixes."""
import json
import os
import subprocess
import sys

import pytest

import up2  # noqa: F401  (must precede any detectron2 import)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def run_two_ranks(tmp_path):
    """Runs a script that calls ``up2.engine.launch(worker, 2, ...)`` with ``tmp_path`` as its argument
    (CPU, gloo) and returns the JSON each rank wrote to ``tmp_path/rank{r}.json``."""

    def run(script: str, timeout: int = 180):
        path = tmp_path / "run.py"
        path.write_text(script)
        result = subprocess.run([sys.executable, str(path), str(tmp_path)], capture_output=True, text=True,
                                timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    return run
