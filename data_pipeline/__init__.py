"""data_pipeline: images on disk to multi-crop batches. `python -m data_pipeline.convert` writes
WebDataset shards; `IndexedViews` reads in-memory images or local shards sample by sample in the
world-size-free global order (`order.py`); `ShardViews` streams shards exactly once per epoch over
ranks and workers; `Photometric` is the batched augmentation that runs on the training device."""

from importlib.metadata import version

from data_pipeline.indexed import IndexedViews, MemorySource, ShardSource
from data_pipeline.stream import ShardViews
from data_pipeline.views import CropSpec, Photometric, PhotometricSpec

__version__ = version("lejepa-scale")  # the one distribution both packages ship in
__all__ = [
    "CropSpec",
    "IndexedViews",
    "MemorySource",
    "Photometric",
    "PhotometricSpec",
    "ShardSource",
    "ShardViews",
    "__version__",
]
