"""Deployment: detection and classification with a fixed vocabulary as ONNX graphs.

* :mod:`up2.deploy.graphs`: the image-in, predictions-out modules that are traced (class-name
  embeddings computed once and kept as constants);
* :mod:`up2.deploy.export`: :func:`~up2.deploy.export.export_onnx` (``tools/deploy/export_onnx.py``);
* :mod:`up2.deploy.runtime`: :class:`~up2.deploy.runtime.OnnxPredictor`, inference with onnxruntime,
  numpy and Pillow only (``tools/deploy/run_onnx.py``);
* :mod:`up2.deploy.evaluation`: results in the model's output format, COCO AP of PyTorch vs the export.

Importing this package imports neither torch nor onnx; import the submodule you need.
"""
