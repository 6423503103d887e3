"""Per-sample error handling for training mappers, so a bad file never kills a data-loader worker
with a bare traceback."""

import logging
from collections import deque

__all__ = ["SkipBadSamples"]

logger = logging.getLogger(__name__)


class SkipBadSamples:
    """Wrap a mapper: a sample whose mapping raises is logged with its file name and skipped.

    Returning None is Detectron2's way to skip (``MapDataset`` then tries another index). Counts are
    per process (each data-loader worker holds its own copy). If ``max_consecutive_failures`` samples
    fail in a row the data is considered broken and a RuntimeError names the last files and errors.
    With ``skip=False`` (evaluation) errors are re-raised with the file name instead of skipped.
    """

    def __init__(self, mapper, max_consecutive_failures: int = 5, skip: bool = True):
        self.mapper = mapper
        self.max_consecutive_failures = max_consecutive_failures
        self.skip = skip
        self.num_seen = 0
        self.num_skipped = 0
        self._consecutive = 0
        self._recent = deque(maxlen=max(max_consecutive_failures, 1))

    def __call__(self, dataset_dict):
        self.num_seen += 1
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            out = self.mapper(dataset_dict)
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            if not self.skip:
                raise RuntimeError(f"Failed to map {file_name}: {msg}") from e
            self.num_skipped += 1
            self._consecutive += 1
            self._recent.append(f"{file_name} ({msg})")
            logger.warning(
                f"Skipping sample {file_name}: {msg} "
                f"[{self.num_skipped} of {self.num_seen} samples skipped so far in this process]"
            )
            if self._consecutive >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{self._consecutive} training samples in a row failed to load; the dataset looks broken. "
                    "Last failures: " + "; ".join(self._recent)
                ) from e
            return None
        self._consecutive = 0
        return out

    def __repr__(self):
        return f"SkipBadSamples({self.mapper!r}, max_consecutive_failures={self.max_consecutive_failures})"
