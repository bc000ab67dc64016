"""Turns the unpacked ``pb1-detectron2==0.6`` sdist into a Detectron2 that installs and works on
today's packages, without its C++ extension (the sdist ships no C++ sources).

    python tools/patch_detectron2_sdist.py SDIST_DIR BUILD_ID

Run by ``tools/setup_env.sh`` before it builds that sdist, and only then: an official Detectron2 that a
user already has is never touched. Every edit checks that the text it replaces is there, so a different
sdist fails loudly here instead of installing half-patched. What it does:

* builds no C++ extension and installs the pure-Python ``detectron2/_C.py`` stand-in
  (``tools/detectron2_C_standin.py``);
* installs the model zoo configs (YAML and LazyConfig ``.py``) as package data, and finds them without
  ``pkg_resources``;
* makes ``detectron2.export`` importable without Caffe2 (gone from PyTorch 2): tracing, scripting and
  model analysis work, the Caffe2 exporter alone raises a clear error;
* ``COCOEvaluator`` falls back to the official pycocotools evaluation when the fast one (C++) is absent;
* ``hooks.LRScheduler`` checkpoints every torch scheduler (torch 2's do not derive from ``_LRScheduler``);
* Python 3.11: ``MapDataset`` no longer calls ``random.sample`` on a set;
* numpy >= 1.24 / 2: the removed aliases ``np.int``, ``np.float``, ``np.str``, ``np.bool``, ``np.object``;
* Pillow >= 10: ``Image.LINEAR`` (removed) becomes ``Image.BILINEAR``;
* ``nms_rotated`` goes through ``_C`` (like the other compiled ops), so that it fails with its clear error;
* the ``black==21.4b2`` pin (that black does not run on current Python) becomes ``black``, so that the
  declared runtime dependencies can be installed;
* writes ``detectron2/_up2_fallback.py`` with BUILD_ID, so that the set-up can tell its own build (and
  whether it is up to date) from any other Detectron2.
"""
import pathlib
import re
import shutil
import sys

TOOLS = pathlib.Path(__file__).resolve().parent

NO_CAFFE2 = '''\
"""Stand-ins for the Caffe2 exporter of ``detectron2.export``: Caffe2 is not part of PyTorch 2, so
``Caffe2Tracer``, ``Caffe2Model`` and the deprecated ``export_*_model`` functions cannot work. (Added by
up2's tools/patch_detectron2_sdist.py.)"""
from detectron2.config import CfgNode

__all__ = ["add_export_config", "Caffe2Tracer", "Caffe2Model", "export_caffe2_model", "export_onnx_model"]

_MESSAGE = (
    "{name} is Detectron2's Caffe2 exporter, which needs Caffe2; Caffe2 is no longer part of PyTorch. "
    "Export with detectron2.export.TracingAdapter (then torch.jit.trace or torch.onnx.export) or "
    "detectron2.export.scripting_with_instances instead."
)


def add_export_config(cfg):
    """Adds the EXPORT_CAFFE2 options, as Detectron2 does (kept so that configs still load)."""
    is_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.EXPORT_CAFFE2 = CfgNode()
    cfg.EXPORT_CAFFE2.USE_HEATMAP_MAX_KEYPOINT = False
    if is_frozen:
        cfg.freeze()
    return cfg


class Caffe2Tracer:
    def __init__(self, *args, **kwargs):
        raise ImportError(_MESSAGE.format(name="Caffe2Tracer"))


class Caffe2Model:
    def __init__(self, *args, **kwargs):
        raise ImportError(_MESSAGE.format(name="Caffe2Model"))

    @staticmethod
    def load_protobuf(*args, **kwargs):
        raise ImportError(_MESSAGE.format(name="Caffe2Model.load_protobuf"))


def export_caffe2_model(*args, **kwargs):
    raise ImportError(_MESSAGE.format(name="export_caffe2_model"))


def export_onnx_model(*args, **kwargs):
    raise ImportError(_MESSAGE.format(name="export_onnx_model"))
'''

# (file, old text, new text): each old text must occur in the file; every occurrence is replaced.
EDITS = [
    # No C++ sources in this sdist: build no extension (the pure-Python _C stand-in is copied below).
    ("setup.py", "    ext_modules=get_extensions(),", "    ext_modules=[],"),
    # get_model_zoo_configs() globs a top-level configs/ that the sdist does not have: the configs
    # already sit inside the package, so install them as its data.
    ("setup.py", '    package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
     '    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},'),
    ("setup.py", '"black==21.4b2",', '"black",'),
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", ""),
    ("detectron2/model_zoo/model_zoo.py",
     'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
     'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)'),
    ("detectron2/export/__init__.py", "from .api import *\n",
     "try:\n"
     "    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401\n"
     "except ImportError:  # PyTorch 2 ships no Caffe2: only the Caffe2 exporter is unavailable\n"
     "    from ._no_caffe2 import *\n"
     "else:\n"
     "    from .api import *\n"),
    ("detectron2/evaluation/coco_evaluation.py", "        self._use_fast_impl = use_fast_impl\n",
     "        from detectron2 import _C\n\n"
     "        if use_fast_impl and getattr(_C, \"BUILT_WITHOUT_EXTENSION\", False):\n"
     "            self._logger.warning(\n"
     "                \"COCOEvaluator: Detectron2 was built without its C++ extension; using the official \"\n"
     "                \"pycocotools evaluation instead of the fast implementation.\"\n"
     "            )\n"
     "            use_fast_impl = False\n"
     "        self._use_fast_impl = use_fast_impl\n"),
    ("detectron2/engine/hooks.py", "isinstance(self.scheduler, torch.optim.lr_scheduler._LRScheduler)",
     "isinstance(self.scheduler, _TORCH_LR_SCHEDULER)"),
    ("detectron2/engine/hooks.py", "from .train_loop import HookBase\n",
     "from .train_loop import HookBase\n\n"
     "# torch >= 2.0: schedulers derive from LRScheduler, no longer from _LRScheduler\n"
     "_TORCH_LR_SCHEDULER = getattr(\n"
     "    torch.optim.lr_scheduler, \"LRScheduler\", torch.optim.lr_scheduler._LRScheduler\n"
     ")\n"),
    ("detectron2/data/common.py", "self._rng.sample(self._fallback_candidates, k=1)",
     "self._rng.sample(list(self._fallback_candidates), k=1)"),
    ("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR"),
    # The one op reached through torch.ops (registered by the missing extension): the stand-in's error.
    ("detectron2/layers/nms.py", "    return torch.ops.detectron2.nms_rotated(boxes, scores, iou_threshold)",
     "    from detectron2 import _C\n\n    return _C.nms_rotated(boxes, scores, iou_threshold)"),
]

# numpy removed these aliases of Python's builtins (1.24; np.bool came back in 2.0).
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|str|bool|object)\b(?![\w.])")


def edit(src: pathlib.Path, relpath: str, old: str, new: str):
    path = src / relpath
    text = path.read_text()
    if old not in text:
        sys.exit(f"patch_detectron2_sdist: {relpath} does not contain the expected text {old!r}")
    path.write_text(text.replace(old, new))


def main(src: str, build_id: str):
    src = pathlib.Path(src)
    for relpath, old, new in EDITS:
        edit(src, relpath, old, new)
    (src / "detectron2/export/_no_caffe2.py").write_text(NO_CAFFE2)
    shutil.copyfile(TOOLS / "detectron2_C_standin.py", src / "detectron2/_C.py")

    replaced = 0
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        new_text, count = NUMPY_ALIAS.subn(r"\1", text)
        if count:
            path.write_text(new_text)
            replaced += count
    if replaced == 0:
        sys.exit("patch_detectron2_sdist: found none of the removed numpy aliases; is this the 0.6 sdist?")

    (src / "detectron2/_up2_fallback.py").write_text(
        '"""Marks a Detectron2 built by up2\'s tools/setup_env.sh from the pb1-detectron2 sdist, without its\n'
        'C++ extension, patched by tools/patch_detectron2_sdist.py (BUILD_ID: hash of those tools)."""\n'
        f'BUILD_ID = "{build_id}"\n')
    print(f"patched {src} ({len(EDITS)} edits, {replaced} numpy aliases)", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    main(*sys.argv[1:])
