"""The tiny UniPerceiverV2 fixtures (``tiny_text_dirs``, ``tiny_up2_cfg``, ``up2_cfg_factory``,
``make_tiny_up2_cfg``) live in the top-level ``tests/conftest.py``: the engine and demo tests use them too."""
