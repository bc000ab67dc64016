"""Preemption and checkpoint disk use (up2.engine.checkpoint_hooks): a real signal stops training after
the current iteration with a checkpoint and exit status 128 + signal; ``--resume`` then ends bitwise
equal to an uninterrupted run; stale ``.tmp-*`` files go at the next start; at most
``SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP`` periodic checkpoints stay on disk."""
import os
import re
import signal
import subprocess
import sys
import time
from typing import Tuple

import pytest
import torch

from up2.checkpoint import AtomicCheckpointer
from up2.engine.checkpoint_hooks import (BoundedPeriodicCheckpointer, PreemptionHook, TrainingPreempted,
                                         max_checkpoints_to_keep, parse_signals)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PERIODIC = re.compile(r"model_\d{7}\.pth")


class _Trainer:
    """What the hooks read from a trainer."""

    def __init__(self, save_dir, iteration, max_iter=10):
        self.iter, self.max_iter = iteration, max_iter
        self.checkpointer = AtomicCheckpointer(torch.nn.Linear(3, 2), save_dir=str(save_dir))


def _periodic(directory):
    return sorted(f for f in os.listdir(directory) if PERIODIC.fullmatch(f))


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_stops_after_the_step_with_a_checkpoint(tmp_path, signum):
    previous = signal.getsignal(signum)
    hook = PreemptionHook(["SIGTERM", "SIGUSR1"])
    hook.trainer = _Trainer(tmp_path, iteration=3)
    hook.before_train()
    try:
        hook.after_step()  # no signal yet: nothing happens
        assert os.listdir(tmp_path) == []
        os.kill(os.getpid(), signum)
        with pytest.raises(TrainingPreempted) as stop:
            hook.after_step()
    finally:
        hook.after_train()
    assert signal.getsignal(signum) is previous  # the handlers are restored
    assert stop.value.code == 128 + signum
    assert str(stop.value) == (f"Training stopped by {signal.Signals(signum).name} after iteration 3; checkpoint "
                               f"{tmp_path / 'model_0000003.pth'}. Run the same command with --resume to continue "
                               "from iteration 4.")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert torch.load(tmp_path / "model_0000003.pth", weights_only=True)["iteration"] == 3


def test_signal_during_the_last_iteration_lets_training_complete(tmp_path):
    hook = PreemptionHook(["SIGUSR1"])
    hook.trainer = _Trainer(tmp_path, iteration=9, max_iter=10)
    hook.before_train()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        hook.after_step()
    finally:
        hook.after_train()
    assert os.listdir(tmp_path) == []


def test_periodic_checkpoints_are_bounded(tmp_path):
    trainer = _Trainer(tmp_path, iteration=0)
    (tmp_path / "model_0000000.pth").write_bytes(b"left by an earlier run")
    hook = BoundedPeriodicCheckpointer(trainer.checkpointer, period=2, max_to_keep=2)
    hook.max_iter = 10
    for iteration in range(10):
        hook.step(iteration)
    assert _periodic(tmp_path) == ["model_0000007.pth", "model_0000009.pth"]
    assert (tmp_path / "model_final.pth").is_file()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"PREEMPTION_SIGNALS: \['SIGTERMS'\] cannot be handled"):
        parse_signals(["SIGTERMS"])
    with pytest.raises(ValueError, match=r"\['SIGKILL'\] cannot be handled.*cannot be caught"):
        parse_signals(["SIGKILL"])
    with pytest.raises(ValueError, match="must be a list of signal names"):
        parse_signals("SIGTERM")
    from detectron2.config import CfgNode

    cfg = CfgNode({"SOLVER": {"UP2": {"MAX_CHECKPOINTS_TO_KEEP": -1}}})
    with pytest.raises(ValueError, match=r"MAX_CHECKPOINTS_TO_KEEP must be an integer >= 0.*got -1"):
        max_checkpoints_to_keep(cfg)


# ------------------------------------------------------------------------- train_net.py, a real SIGTERM
# A sitecustomize module (imported by every Python process the test starts, spawned ranks included)
# that adds one test-only hook to UP2Trainer: at iteration UP2_TEST_WAIT_AT it creates UP2_TEST_MARKER and
# waits until the test has sent its signal (MARKER.sent): the signal arrives in the middle of that
# iteration whatever the speed of the machine.
WAIT_FOR_THE_SIGNAL = """
import os

if os.environ.get("UP2_TEST_WAIT_AT"):
    import time

    import up2  # noqa: F401
    from detectron2.engine import HookBase
    import up2.engine.trainer as trainer_module

    class WaitForTheSignal(HookBase):
        def before_step(self):
            if self.trainer.iter == int(os.environ["UP2_TEST_WAIT_AT"]):
                marker = os.environ["UP2_TEST_MARKER"]
                open(marker, "w").close()
                deadline = time.time() + 120
                while not os.path.exists(marker + ".sent") and time.time() < deadline:
                    time.sleep(0.05)

    build_hooks = trainer_module.UP2Trainer.build_hooks
    trainer_module.UP2Trainer.build_hooks = lambda self: build_hooks(self) + [WaitForTheSignal()]
"""


def _environment(datasets_root):
    return {**os.environ, "DETECTRON2_DATASETS": datasets_root, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def _train_net(config, output, datasets_root, *extra):
    return subprocess.run([sys.executable, "train_net.py", "--config-file", config, *extra, "OUTPUT_DIR", str(output)],
                          cwd=REPO, env=_environment(datasets_root), capture_output=True, text=True, timeout=600)


def _interrupted_train_net(tmp_path, args, datasets_root, stop_at: int) -> Tuple[int, str]:
    """Runs ``train_net.py args``, sends SIGTERM to it during iteration ``stop_at``; returns (exit status,
    console output)."""
    hooks_dir, marker, console = tmp_path / "test_hooks", tmp_path / "in_iteration", tmp_path / "console.txt"
    hooks_dir.mkdir()
    (hooks_dir / "sitecustomize.py").write_text(WAIT_FOR_THE_SIGNAL)
    env = {**_environment(datasets_root), "UP2_TEST_WAIT_AT": str(stop_at), "UP2_TEST_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(hooks_dir)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    with open(console, "w") as out:  # a file, not a pipe: nothing blocks the child while the test waits
        process = subprocess.Popen([sys.executable, "train_net.py", *args], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), console.read_text()[-5000:]
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # (a launcher passes it on to its workers)
        (tmp_path / "in_iteration.sent").touch()
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, console.read_text()


def _tiny_config(tiny_multitask_cfg, engine_shapes, tmp_path, max_iter: int, **solver) -> str:
    cfg = tiny_multitask_cfg(tmp_path / "unused", max_iter=max_iter)
    for task in cfg.DATASETS.UP2.TASKS:  # train_net.py registers the shapes of $DETECTRON2_DATASETS/shapes
        task["TRAIN_DATASETS"] = [name.replace(engine_shapes[1] + "_", "shapes_") for name in task["TRAIN_DATASETS"]]
    for key, value in solver.items():
        setattr(cfg.SOLVER.UP2 if key == "MAX_CHECKPOINTS_TO_KEEP" else cfg.SOLVER, key, value)
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    return str(config)


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_multitask_cfg, engine_shapes,
                                                                             tmp_path):
    stop_at = 2
    config = _tiny_config(tiny_multitask_cfg, engine_shapes, tmp_path, max_iter=8, CHECKPOINT_PERIOD=2,
                          MAX_CHECKPOINTS_TO_KEEP=2)
    datasets_root = os.path.dirname(engine_shapes[0])

    reference = _train_net(config, tmp_path / "uninterrupted", datasets_root)
    assert reference.returncode == 0, reference.stderr[-5000:]
    assert _periodic(tmp_path / "uninterrupted") == ["model_0000005.pth", "model_0000007.pth"]  # 1, 3 removed

    output = tmp_path / "preempted"
    status, log = _interrupted_train_net(tmp_path, ["--config-file", config, "OUTPUT_DIR", str(output)],
                                         datasets_root, stop_at)
    assert status == 128 + signal.SIGTERM, log[-5000:]
    checkpoint = output / f"model_{stop_at:07d}.pth"
    assert (f"Training stopped by SIGTERM after iteration {stop_at}; checkpoint {checkpoint}. Run the same command "
            f"with --resume to continue from iteration {stop_at + 1}.") in log
    assert "Traceback" not in log
    assert (output / "last_checkpoint").read_text() == checkpoint.name
    assert torch.load(checkpoint, map_location="cpu")["iteration"] == stop_at  # a complete, loadable checkpoint
    assert not (output / "model_final.pth").exists()

    stale = output / ".tmp-k1lled0model_0000003.pth"  # what a run killed while writing a checkpoint leaves
    stale.write_bytes(checkpoint.read_bytes()[:1000])
    resumed = _train_net(str(config), output, datasets_root, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"Removed {stale}" in resumed.stdout + resumed.stderr
    assert [f for f in os.listdir(output) if f.startswith(".tmp-")] == []
    assert "Starting training from iteration 3" in resumed.stdout + resumed.stderr
    assert _periodic(output) == ["model_0000005.pth", "model_0000007.pth"]

    expected = torch.load(tmp_path / "uninterrupted" / "model_final.pth", map_location="cpu")["model"]
    actual = torch.load(output / "model_final.pth", map_location="cpu")["model"]
    assert list(actual) == list(expected)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_two_ranks_stops_both_with_one_checkpoint(tiny_multitask_cfg, engine_shapes,
                                                                            tmp_path):
    stop_at, output = 1, tmp_path / "run"
    config = _tiny_config(tiny_multitask_cfg, engine_shapes, tmp_path, max_iter=6)
    # the signal goes to the launcher only: it passes it on to its two workers
    status, log = _interrupted_train_net(tmp_path, ["--config-file", config, "--num-gpus", "2", "--dist-url", "auto",
                                                    "OUTPUT_DIR", str(output)], os.path.dirname(engine_shapes[0]),
                                         stop_at)
    assert status == 128 + signal.SIGTERM, log[-5000:]
    assert f"Training stopped by SIGTERM after iteration {stop_at}" in log
    assert "Traceback" not in log
    assert (output / "last_checkpoint").read_text() == f"model_{stop_at:07d}.pth"
    assert torch.load(output / f"model_{stop_at:07d}.pth", map_location="cpu")["iteration"] == stop_at
    assert not (output / "model_final.pth").exists()
