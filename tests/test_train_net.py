"""train_net.py: Detectron2's command line, CPU multi-process training, eval_results.json; weights of another
model and a missing dataset root are errors that say what to do."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = os.path.join(REPO, "configs", "shapes", "mask_rcnn_R18_FPN_baseline.yaml")


def run(args, env=None, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def test_help_shows_detectron2_options():
    result = run(["train_net.py", "--help"])
    assert result.returncode == 0, result.stderr
    for option in ("--config-file", "--num-gpus", "--num-machines", "--machine-rank", "--dist-url", "--resume",
                   "--eval-only", "opts"):
        assert option in result.stdout


def test_config_typo_on_command_line_is_rejected(tmp_path):
    result = run(["train_net.py", "--config-file", BASELINE, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITERS", "3"])
    assert result.returncode != 0
    assert "SOLVER.MAX_ITERS" in result.stderr


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("d2datasets")
    result = run(["-m", "up2.data.shapes", "--out", str(root / "shapes"), "--seed", "0",
                  "--num-train", "16", "--num-val", "6"])
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
def test_two_cpu_processes_train_then_eval_only(tiny_shapes, tmp_path):
    env = {"DETECTRON2_DATASETS": str(tiny_shapes)}
    output = tmp_path / "run"
    opts = ["OUTPUT_DIR", str(output), "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1",
            "SOLVER.STEPS", "(2,)", "DATALOADER.NUM_WORKERS", "0"]
    result = run(["train_net.py", "--config-file", BASELINE, "--num-gpus", "2", "--dist-url", "auto", *opts], env)
    assert result.returncode == 0, result.stderr[-5000:]
    log = (output / "log.txt").read_text()
    assert "world_size=2" in log.replace(" ", "") or "Rank of current process: 0. World size: 2" in log
    assert "eta:" in log
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in m for m in metrics)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(output))
    assert (output / "model_final.pth").is_file()
    results = json.loads((output / "eval_results.json").read_text())
    assert set(results) == {"shapes_det_val"} and "bbox/AP" in results["shapes_det_val"]

    eval_dir = tmp_path / "eval"
    result = run(["train_net.py", "--config-file", BASELINE, "--eval-only", "MODEL.WEIGHTS",
                  str(output / "model_final.pth"), "OUTPUT_DIR", str(eval_dir)], env)
    assert result.returncode == 0, result.stderr[-5000:]
    results_again = json.loads((eval_dir / "eval_results.json").read_text())
    assert results_again["shapes_det_val"]["bbox/AP"] == pytest.approx(results["shapes_det_val"]["bbox/AP"], abs=1e-6)
    assert "segm/AP" in results_again["shapes_det_val"]


@pytest.mark.slow
def test_eval_only_refuses_weights_of_another_model(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    import torch

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    result = run(["train_net.py", "--config-file", BASELINE, "--eval-only", "MODEL.WEIGHTS", str(weights),
                  "OUTPUT_DIR", str(tmp_path / "eval")])
    assert result.returncode != 0
    assert f"{weights} does not fit the model" in result.stderr
    assert "tensor(s) in it that the model does not have: conv1.weight" in result.stderr
    assert not (tmp_path / "eval" / "eval_results.json").exists()


@pytest.mark.slow
def test_missing_dataset_root_says_how_to_make_it(tmp_path):
    missing = str(tmp_path / "nonexistent")
    result = run(["train_net.py", "--config-file", os.path.join(REPO, "configs", "shapes", "up2_multitask_R18.yaml"),
                  "OUTPUT_DIR", str(tmp_path / "run"), "SOLVER.MAX_ITER", "1"], env={"DETECTRON2_DATASETS": missing})
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert f"DETECTRON2_DATASETS='{missing}'" in last_line
    assert f"python -m up2.data.shapes --out {missing}/shapes --seed 0" in last_line
    assert "hub" not in last_line
