"""Per-sample error handling for training mappers, so a bad file never kills a data-loader worker
with a bare traceback."""

import logging
import os
from collections import deque

__all__ = ["SkipBadSamples", "CheckGroundTruthSize"]

logger = logging.getLogger(__name__)


class SkipBadSamples:
    """Wrap a mapper: a sample whose mapping raises is logged with its file name and skipped.

    Returning None is Detectron2's way to skip (``MapDataset`` then tries another index). Counts are
    per process (each data-loader worker holds its own copy). If ``max_consecutive_failures`` samples
    fail in a row the data is considered broken and a RuntimeError names the last files and errors.
    With ``skip=False`` (evaluation) errors are re-raised with the file name instead of skipped.
    If ``record_dir`` is set (the Trainer does), each skip is also appended to ``record_dir/<pid>.txt`` so
    that the end-of-run summary counts the skips of all data-loader workers.
    """

    record_dir = None

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
            self._record(file_name, msg)
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

    def _record(self, file_name, msg):
        if not self.record_dir:
            return
        try:
            os.makedirs(self.record_dir, exist_ok=True)
            with open(os.path.join(self.record_dir, f"{os.getpid()}.txt"), "a") as f:
                f.write(f"{file_name}\t{msg.splitlines()[0] if msg else ''}\n")
        except OSError as e:  # the summary is a convenience: never fail a run for it
            logger.debug(f"could not record the skipped sample {file_name}: {e}")

    def __repr__(self):
        return f"SkipBadSamples({self.mapper!r}, max_consecutive_failures={self.max_consecutive_failures})"


class CheckGroundTruthSize:
    """Wrap an inference mapper: before mapping, the ground-truth PNGs the evaluators will read
    (``sem_seg_file_name``, ``pan_seg_file_name``) must have the image's size. Only the PNG headers are
    read (cheap), and the error names both files before the inference pass, not inside panopticapi's
    worker pool after it."""

    KEYS = (("sem_seg_file_name", "semantic label map"), ("pan_seg_file_name", "panoptic label"))

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        from PIL import Image

        from .utils import check_label_size

        present = [(k, what) for k, what in self.KEYS if dataset_dict.get(k)]
        if present:
            with Image.open(dataset_dict["file_name"]) as im:
                w, h = im.size
            for key, what in present:
                with Image.open(dataset_dict[key]) as lab:
                    lw, lh = lab.size
                check_label_size((lh, lw), (h, w), dataset_dict["file_name"], dataset_dict[key], what)
        return self.mapper(dataset_dict)

    def __repr__(self):
        return f"CheckGroundTruthSize({self.mapper!r})"
