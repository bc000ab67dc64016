"""Pure-Python stand-in for Detectron2's compiled extension ``detectron2._C``.

Installed by up2's ``tools/setup_env.sh`` when Detectron2 is built from the ``pb1-detectron2==0.6``
sdist, which ships without its C++/CUDA sources. Detectron2 imports ``_C`` at module level in a few
places (deformable convolution, rotated boxes, the fast COCO evaluation); up2 needs none of those ops
(NMS and ROIAlign come from torchvision, COCO evaluation runs with ``use_fast_impl=False``).
Anything that does reach for a compiled op gets an error that says what happened and how to fix it.
"""

_MESSAGE = (
    "detectron2._C.{name} is a compiled Detectron2 op, but this Detectron2 was installed by up2's "
    "tools/setup_env.sh without its C++ extension (the pb1-detectron2 sdist ships no C++ sources). "
    "up2 does not need it; if your code does, install the official Detectron2 from its git "
    "repository (pip install 'git+https://github.com/facebookresearch/detectron2.git') and re-run "
    "the set-up, which keeps an existing Detectron2."
)

BUILT_WITHOUT_EXTENSION = True


class MissingCompiledOpError(RuntimeError):
    """Raised when code calls a compiled Detectron2 op that this installation does not have."""


def has_cuda():
    return False


def get_compiler_version():
    return "none (pure-Python stand-in installed by up2)"


def get_cuda_version():
    return "none (pure-Python stand-in installed by up2)"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise MissingCompiledOpError(_MESSAGE.format(name=name))
