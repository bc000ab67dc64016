"""The Detectron2 that ``tools/setup_env.sh`` installs works for everyday Detectron2 use, not only for up2:
model zoo configs, ``detectron2.export``, COCO and semantic-segmentation evaluation with their defaults,
scheduler checkpoints, ``MapDataset`` skipping samples, ``LazyConfig.to_py``, current numpy. The tests hold
for an official Detectron2 too; those about the fallback build itself (tools/patch_detectron2_sdist.py)
are skipped there. No network: the one weight file a model zoo config names is created in the cache."""
import importlib.metadata
import importlib.util
import logging
import pickle
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

import up2  # noqa: F401  (must precede any detectron2 import)
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import LazyConfig  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetFromList, MapDataset, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402

FALLBACK_BUILD = importlib.util.find_spec("detectron2._up2_fallback") is not None
fallback_only = pytest.mark.skipif(not FALLBACK_BUILD, reason="about the Detectron2 that up2's set-up builds")

YAML_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
LAZY_CONFIG = "common/models/mask_rcnn_fpn.py"


@pytest.fixture
def registered(request):
    """register(name, records, **metadata): a dataset registered for this test only."""
    names = []

    def register(name, records, **metadata):
        name = f"{name}_{request.node.name}"
        DatasetCatalog.register(name, lambda: records)
        MetadataCatalog.get(name).set(**metadata)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ------------------------------------------------------------------------------------------ model zoo
def test_model_zoo_configs_are_installed():
    path = model_zoo.get_config_file(YAML_CONFIG)
    assert path.endswith(YAML_CONFIG)
    cfg = model_zoo.get_config(YAML_CONFIG)
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
    assert cfg.MODEL.RESNETS.DEPTH == 50  # read from the file and its _BASE_

    assert model_zoo.get_config_file(LAZY_CONFIG).endswith(LAZY_CONFIG)
    lazy = model_zoo.get_config(LAZY_CONFIG)
    assert lazy.model.roi_heads.mask_head is not None
    assert lazy.model._target_.__name__ == "GeneralizedRCNN"
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        model_zoo.get_config_file("COCO-InstanceSegmentation/no_such_model.yaml")


def test_model_zoo_get_builds_mask_rcnn_and_loads_its_weights(tmp_path, monkeypatch):
    # The config's MODEL.WEIGHTS is detectron2://ImageNetPretrained/MSRA/R-50.pkl: put a Caffe2-format
    # file where the download cache has it, so that the real URL -> cache -> loader path runs offline.
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path))
    weights = tmp_path / "detectron2/ImageNetPretrained/MSRA/R-50.pkl"
    weights.parent.mkdir(parents=True)
    stem = np.full((64, 3, 7, 7), 0.5, dtype=np.float32)
    weights.write_bytes(pickle.dumps({"blobs": {"conv1_w": stem}}))

    model = model_zoo.get(YAML_CONFIG, trained=False, device="cpu")
    assert type(model).__name__ == "GeneralizedRCNN" and model.roi_heads.mask_on
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, torch.from_numpy(stem))

    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)}])
    instances = output["instances"]
    assert instances.image_size == (64, 96) and instances.has("pred_masks")


# ------------------------------------------------------------------------------------------ export
class _BoxModel(torch.nn.Module):
    """A small detector-shaped model: a list of {"image"} dicts in, a list of {"instances"} out."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, inputs):
        outputs = []
        for item in inputs:
            features = self.conv(item["image"][None])[0]  # (5, H, W)
            box = features.mean(dim=(1, 2))[:4].abs().cumsum(0)
            boxes = torch.stack([box, 2 * box])
            instances = Instances(item["image"].shape[-2:])
            instances.pred_boxes = Boxes(boxes)
            instances.scores = features.amax(dim=(1, 2))[:2].sigmoid()
            outputs.append({"instances": instances})
        return outputs


def test_tracing_adapter_traces_a_model():
    from detectron2.export import TracingAdapter, dump_torchscript_IR, scripting_with_instances  # noqa: F401
    from detectron2.utils.analysis import flop_count_operators  # noqa: F401  (imports TracingAdapter)

    torch.manual_seed(0)
    model = _BoxModel().eval()
    inputs = [{"image": torch.rand(3, 16, 20)}]
    adapter = TracingAdapter(model, inputs)
    traced = torch.jit.trace(adapter, adapter.flattened_inputs)

    new_image = torch.rand(3, 16, 20)
    (expected,) = model([{"image": new_image}])
    (result,) = adapter.outputs_schema(traced(new_image))
    assert torch.allclose(result["instances"].pred_boxes.tensor, expected["instances"].pred_boxes.tensor)
    assert torch.allclose(result["instances"].scores, expected["instances"].scores)


@fallback_only
def test_only_the_caffe2_exporter_refuses():
    import detectron2.export as export

    if importlib.util.find_spec("caffe2") is not None:
        pytest.skip("Caffe2 is installed")
    with pytest.raises(ImportError, match="Caffe2"):
        export.Caffe2Tracer(None, _BoxModel(), None)
    from detectron2.config import get_cfg

    assert export.add_export_config(get_cfg()).EXPORT_CAFFE2.USE_HEATMAP_MAX_KEYPOINT is False


@fallback_only
def test_compiled_ops_fail_clearly():
    from detectron2._C import MissingCompiledOpError
    from detectron2.layers import nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    boxes, scores = torch.tensor([[10.0, 10.0, 4.0, 6.0, 30.0]] * 2), torch.tensor([0.9, 0.8])
    with pytest.raises(MissingCompiledOpError, match="nms_rotated .*official Detectron2"):
        nms_rotated(boxes, scores, 0.5)
    with pytest.raises(MissingCompiledOpError, match="box_iou_rotated"):
        pairwise_iou_rotated(RotatedBoxes(boxes), RotatedBoxes(boxes))


# ------------------------------------------------------------------------------------------ evaluation
def _square(x, y, size):
    return [float(v) for v in (x, y, x + size, y, x + size, y + size, x, y + size)]


def _xyxy(polygon):
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs), max(ys)]


def test_coco_evaluator_with_its_defaults(tmp_path, registered, ground_truth_instances, caplog):
    from detectron2.evaluation import COCOEvaluator

    records = []
    for image_id in range(3):
        polygons = [_square(5 + 10 * image_id, 8, 20), _square(40, 30 + 5 * image_id, 12)]
        annotations = [{"bbox": BoxMode.convert(_xyxy(p), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS),
                        "bbox_mode": BoxMode.XYWH_ABS, "category_id": k, "segmentation": [p], "iscrowd": 0}
                       for k, p in enumerate(polygons)]
        records.append({"file_name": f"image{image_id}.png", "image_id": image_id, "height": 64, "width": 80,
                        "annotations": annotations})
    name = registered("d2install_coco", records, thing_classes=["a", "b"])

    with caplog.at_level(logging.WARNING):
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path))  # use_fast_impl=True by default
    evaluator.reset()
    for record in records:
        instances = ground_truth_instances(record, [a["category_id"] for a in record["annotations"]])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    if FALLBACK_BUILD:  # no compiled fast evaluation: the official one ran, and it said so
        assert "without its C++ extension" in caplog.text


def test_sem_seg_evaluator_runs(tmp_path, registered):
    from detectron2.evaluation import SemSegEvaluator

    records, predictions = [], []
    for i in range(2):
        gt = np.zeros((12, 16), dtype=np.uint8)
        gt[:, 8:] = 1
        gt[: 3 + i, :] = 2
        gt[0, 0] = 255  # ignored
        Image.fromarray(gt).save(tmp_path / f"gt{i}.png")
        records.append({"file_name": f"image{i}.png", "sem_seg_file_name": str(tmp_path / f"gt{i}.png")})
        pred = np.where(gt == 255, 0, gt)
        pred[-1, -1] = 0  # one wrong pixel (class 1 predicted as 0)
        predictions.append(torch.nn.functional.one_hot(torch.from_numpy(pred).long(), 3).permute(2, 0, 1).float())
    name = registered("d2install_sem_seg", records, stuff_classes=["x", "y", "z"], ignore_label=255)

    evaluator = SemSegEvaluator(name, output_dir=str(tmp_path))
    evaluator.reset()
    for record, logits in zip(records, predictions):
        evaluator.process([{"file_name": record["file_name"]}], [{"sem_seg": logits}])
    results = evaluator.evaluate()["sem_seg"]
    assert results["IoU-z"] == pytest.approx(100.0)
    assert 90.0 < results["mIoU"] < 100.0
    assert results["pACC"] == pytest.approx(100.0 * (1 - 2 / (2 * (12 * 16 - 1))))


def test_numpy_aliases_in_dataset_helpers(tmp_path, caplog):
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    # Pascal VOC loader (np.str): one image with one object.
    (tmp_path / "ImageSets/Main").mkdir(parents=True)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets/Main/train.txt").write_text("000001\n000002\n")
    for file_id in ("000001", "000002"):
        root = ET.fromstring("<annotation><size><width>50</width><height>40</height></size>"
                             "<object><name>cat</name><difficult>0</difficult><bndbox><xmin>2</xmin>"
                             "<ymin>3</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object></annotation>")
        ET.ElementTree(root).write(tmp_path / f"Annotations/{file_id}.xml")
    records = load_voc_instances(str(tmp_path), "train", ["dog", "cat"])
    assert [r["image_id"] for r in records] == ["000001", "000002"]
    assert records[0]["annotations"][0]["category_id"] == 1

    # The class histogram printed when a dataset is built (np.int).
    with caplog.at_level(logging.INFO, logger="detectron2.data.build"):
        print_instances_class_histogram(records, ["dog", "cat"])
    assert "cat" in caplog.text and "total" in caplog.text


# ------------------------------------------------------------------------------------------ training
def test_step_lr_survives_a_checkpoint_round_trip(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import SimpleTrainer, hooks

    class LossModel(torch.nn.Linear):
        def forward(self, batch):
            return {"loss": super().forward(batch).pow(2).mean()}

    def make(lr):
        model = LossModel(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.1)
        data = iter(lambda: torch.rand(2, 3), None)  # endless
        trainer = SimpleTrainer(model, data, optimizer)
        trainer.register_hooks([hooks.LRScheduler(scheduler=scheduler)])
        checkpointer = DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer, trainer=trainer)
        return trainer, optimizer, scheduler, checkpointer

    trainer, optimizer, scheduler, checkpointer = make(lr=1.0)
    trainer.train(0, 7)
    assert scheduler.last_epoch == 7 and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    checkpointer.save("model_final")
    assert trainer.state_dict()["hooks"]  # the scheduler is in the checkpoint

    trainer, optimizer, scheduler, checkpointer = make(lr=123.0)
    checkpointer.resume_or_load(str(tmp_path / "model_final.pth"), resume=True)
    assert scheduler.last_epoch == 7 and scheduler.state_dict()["last_epoch"] == 7
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_map_dataset_skips_a_sample_the_mapper_drops():
    dataset = MapDataset(DatasetFromList(list(range(10)), copy=False),
                         lambda x: None if x % 2 else {"value": x})
    values = [dataset[i]["value"] for i in range(len(dataset))]
    assert all(v % 2 == 0 for v in values)
    assert values[0::2] == [0, 2, 4, 6, 8]  # the kept samples are returned as they are


# ------------------------------------------------------------------------------------------ config
def test_lazy_config_to_py(tmp_path):
    cfg = model_zoo.get_config(LAZY_CONFIG)
    code = LazyConfig.to_py(cfg)  # formatted with black
    compile(code, "<to_py>", "exec")
    assert "cfg.model = detectron2.modeling.GeneralizedRCNN(\n    backbone=" in code
    LazyConfig.save(cfg, str(tmp_path / "mask_rcnn.yaml"))
    assert LazyConfig.load(str(tmp_path / "mask_rcnn.yaml")).model.roi_heads.num_classes == 80


@fallback_only
def test_fallback_build_has_its_runtime_dependencies():
    from packaging.requirements import Requirement

    missing = []
    for line in importlib.metadata.requires("pb1-detectron2"):
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an extra, or another Python
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            missing.append(f"{requirement} (installed: {installed})")
    assert not missing, missing
    import black  # noqa: F401
    import pydot  # noqa: F401
