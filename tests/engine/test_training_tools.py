"""tools/single_task_training.py and tools/reference_classifier.py on the tiny shapes dataset: the
reported numbers are the losses the runs produced, and bad task names are named."""
import importlib.util
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"up2_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_single_task_training_reports_its_own_losses(tiny_multitask_cfg, tmp_path, monkeypatch):
    tool = load_tool("single_task_training")
    cfg = tiny_multitask_cfg(tmp_path, tasks=("classification", "mlm"), max_iter=8)
    recorded = []
    real_step = tool.build_lr_scheduler

    def scheduler_spy(cfg_, optimizer):
        scheduler = real_step(cfg_, optimizer)
        original = scheduler.step

        def step(*args, **kwargs):
            original(*args, **kwargs)
            recorded.append(optimizer.param_groups[0]["lr"])
        scheduler.step = step
        return scheduler

    monkeypatch.setattr(tool, "build_lr_scheduler", scheduler_spy)
    result = tool.train_one_task(cfg, "mlm", iters=4, window=2)
    assert set(result) == {"task", "initial", "first", "last", "reduction", "reduction_from_initial",
                           "seconds_per_iter"}
    assert result["task"] == "mlm" and all(math.isfinite(result[k]) for k in ("initial", "first", "last"))
    assert result["reduction"] == pytest.approx(1 - result["last"] / result["first"], abs=2e-4)
    assert result["reduction_from_initial"] == pytest.approx(1 - result["last"] / result["initial"], abs=2e-4)
    # the config's warm-up is followed: the learning rate rises over the 4 steps (WARMUP_ITERS = 5)
    assert len(recorded) == 4 and recorded == sorted(recorded) and recorded[0] < recorded[-1]
    with pytest.raises(KeyError, match="captioning"):
        tool.train_one_task(cfg, "captioning", iters=1)


def test_reference_classifier_trains_and_scores_the_test_split(tiny_multitask_cfg, tmp_path, engine_shapes):
    tool = load_tool("reference_classifier")
    cfg = tiny_multitask_cfg(tmp_path, tasks=("classification",))
    cfg.DATASETS.UP2.TASKS[0]["TEST_DATASETS"] = [f"{engine_shapes[1]}_cls_val"]
    for net in ("small_bn", "backbone"):
        result = tool.run(cfg, net, iters=2, lr=1e-3, window=1)
        assert result["net"] == net and result["test_images"] == 10
        assert 0.0 <= result["test_top1"] <= 100.0 and result["test_top1"] * 10 % 100 == 0  # k of 10 images
    with pytest.raises(KeyError, match="nope"):
        tool.run(cfg, "small_bn", iters=1, lr=1e-3, task_name="nope")
    with pytest.raises(ValueError, match="--net"):
        tool.run(cfg, "vit", iters=1, lr=1e-3)


def test_background_study_keeps_the_shapes_and_replaces_only_the_background():
    tool = load_tool("shapes_background_study")
    spec = tool.load_spec()
    textured, labels = tool.render_split(1, 4, "textured", tool.RENDER_SIZE, spec)
    gray, gray_labels = tool.render_split(1, 4, "gray", tool.RENDER_SIZE, spec)
    assert labels.tolist() == gray_labels.tolist() == [0, 1, 2, 3]
    neutral = (128 / 255.0 - 0.5) / 0.25
    for index in range(4):
        sample = tool.render_classification_image(0, 1, index, index, tool.RENDER_SIZE, spec)
        shapes = torch.from_numpy(sum(instance.mask for instance in sample.instances) > 0)
        assert torch.equal(gray[index][:, shapes], textured[index][:, shapes])
        assert torch.allclose(gray[index][:, ~shapes], torch.tensor(neutral), atol=1e-6)
        assert not torch.allclose(textured[index][:, ~shapes], torch.tensor(neutral), atol=1e-6)
    with pytest.raises(ValueError, match="'checkered'"):
        tool.render_split(1, 1, "checkered", 32, spec)


def test_background_study_vivid_variant_draws_version_1_backgrounds():
    """``vivid``: the backgrounds of spec version 1 (independent, often saturated colours) under the
    same labels; ``textured``: the generator's muted ones (two close colours of low saturation)."""
    tool = load_tool("shapes_background_study")
    spec = tool.load_spec()
    assert spec["background_style"] == "muted"
    muted, labels = tool.render_split(1, 10, "textured", tool.RENDER_SIZE, spec)
    vivid, vivid_labels = tool.render_split(1, 10, "vivid", tool.RENDER_SIZE, spec)
    assert labels.tolist() == vivid_labels.tolist()

    def background_saturation(images, style):
        values = []
        for index in range(len(images)):
            style_spec = {**spec, "background_style": style}
            sample = tool.render_classification_image(0, 1, index, index % 10, tool.RENDER_SIZE, style_spec)
            shapes = torch.from_numpy(sum(instance.mask for instance in sample.instances) > 0)
            pixels = images[index][:, ~shapes]  # (3, P)
            values.append(float((pixels.max(0).values - pixels.min(0).values).mean()))
        return sum(values) / len(values)

    assert background_saturation(muted, "muted") * 2 < background_saturation(vivid, "vivid")


def test_background_study_reports_what_it_trained():
    tool = load_tool("shapes_background_study")
    spec = tool.load_spec()
    train, val = tool.render_split(0, 20, "gray", 32, spec), tool.render_split(1, 10, "gray", 32, spec)
    result = tool.train_and_evaluate(train, val, len(spec["categories"]), seconds=0.5)
    assert result["iterations"] >= 1
    assert result["val_top1"] in {10.0 * k for k in range(11)}  # a share of 10 validation images


def test_single_task_training_batch_size_override(tiny_multitask_cfg, tmp_path):
    tool = load_tool("single_task_training")
    cfg = tiny_multitask_cfg(tmp_path, tasks=("classification", "mlm"), max_iter=8)
    new_size = 1 + max(e.batch_size for e in tool.get_task_entries(cfg))
    changed = tool.with_batch_size(cfg, "mlm", new_size)
    sizes = {e.name: e.batch_size for e in tool.get_task_entries(changed)}
    original = {e.name: e.batch_size for e in tool.get_task_entries(cfg)}
    assert sizes["mlm"] == new_size and sizes["classification"] == original["classification"]
    assert original["mlm"] != new_size  # the given config is left as it was
    with pytest.raises(KeyError, match="captioning"):
        tool.with_batch_size(cfg, "captioning", 3)
    with pytest.raises(ValueError, match="mlm"):
        tool.with_batch_size(cfg, "mlm", 0)
