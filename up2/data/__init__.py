"""Data: dataset registration, the embedded ``shapes`` generator, mappers and loaders."""
from up2.data import datasets  # noqa: F401  (registers the built-in datasets)
from up2.data.samplers import WeightedDatasetSampler, dataset_sampling_weights  # noqa: F401,E402
from up2.data.mappers import build_mapper  # noqa: F401,E402
from up2.data.build import (  # noqa: F401,E402
    MultiTaskDataLoader,
    build_task_test_loader,
    build_task_train_loader,
    build_task_train_loaders,
    mixed_batch_sizes,
)
