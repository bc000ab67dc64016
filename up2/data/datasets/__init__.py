"""Dataset registration (importing this package registers the built-in datasets)."""
from up2.data.datasets.register import *  # noqa: F401,F403
from up2.data.datasets.builtin import (get_datasets_root, register_all_shapes,  # noqa: F401
                                       register_all_up2_datasets)
