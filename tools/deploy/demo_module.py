"""``demo/demo.py`` as a module, for the deployment tools that share its argument checks and drawing."""
import importlib.util
import os

DEMO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "demo", "demo.py")


def load_demo():
    """The ``demo/demo.py`` module (``visualize``, ``parse_vocabulary``, ``expand_inputs``, ...)."""
    spec = importlib.util.spec_from_file_location("up2_demo", os.path.normpath(DEMO_PATH))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
