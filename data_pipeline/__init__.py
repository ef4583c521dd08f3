"""data_pipeline: images on disk to multi-crop batches. `python -m data_pipeline.convert` writes
WebDataset shards; `ShardViews` streams them exactly once per epoch over ranks and workers;
`InMemoryViews` does the same for in-memory image tensors; `Photometric` is the batched
augmentation that runs on the training device."""

from importlib.metadata import version

from data_pipeline.in_memory import InMemoryViews
from data_pipeline.stream import ShardViews
from data_pipeline.views import CropSpec, Photometric, PhotometricSpec

__version__ = version("lejepa-scale")  # the one distribution both packages ship in
__all__ = ["CropSpec", "InMemoryViews", "Photometric", "PhotometricSpec", "ShardViews", "__version__"]
