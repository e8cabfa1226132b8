"""Known datasets: (env, task, quality) -> where the data comes from.

(Interface fixed; the body is filled in by the catalog work of issue 2.)
"""

from __future__ import annotations

from pathlib import Path

from common.data import DatasetError, OfflineDataset


def resolve(env: str, task: str, quality: str, dataset: str | None = None, *, download: bool = True,
            generate: bool = True) -> Path:
    """Path of a native-format dataset for (env, task, quality): ``dataset`` when given
    (converted once if it is in a foreign format), else the cache, else a download
    or a local generation recipe. Raises ``DatasetError`` with what exists otherwise."""
    if dataset:
        from common.data import load_dataset

        return Path(load_dataset(dataset).meta.get("path", dataset))
    raise DatasetError(f"no dataset known for {env}/{task}/{quality} yet; pass --dataset PATH")


def load(env: str, task: str, quality: str, dataset: str | None = None, **kwargs) -> OfflineDataset:
    """``OfflineDataset.load(resolve(...))``."""
    return OfflineDataset.load(resolve(env, task, quality, dataset), **kwargs)
