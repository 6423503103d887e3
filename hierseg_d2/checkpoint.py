"""The one place where hierseg_d2 reads and writes checkpoint files.

Loading is safe by default: a ``.pth`` (or any non-``.pkl``) file is read with
``torch.load(weights_only=True)`` and a Detectron2 / Caffe2 ``.pkl`` with :class:`RestrictedUnpickler`
(numpy arrays, numpy scalars and plain containers only). A file that needs anything else (a pickled
class, a function) is refused with a message naming it and the opt-in for trusted files:
``MODEL.WEIGHTS_TRUSTED True`` for configs (training, ``--eval-only``, ``--resume``, demo, tools), ``--trusted``
for the converters.

:class:`HierSegCheckpointer` (a ``DetectionCheckpointer``) adds:

* a match check: the model tensors a checkpoint provides (same name and shape) must reach
  ``MODEL.WEIGHTS_MIN_MATCHED`` of the reference set, else an error names the file and the first missing
  names. The reference set is the backbone (``backbone.*``) when every matched name is a backbone
  name (ImageNet-pretrained weights: a legitimate partial load), else the whole model. 0 matched tensors
  is always an error; ``MODEL.WEIGHTS_MIN_MATCHED 0.0`` turns the share check off.
* atomic writes (temporary file in the same directory + ``os.replace``), also for ``last_checkpoint``;
* ``resume_or_load(resume=True)`` that skips damaged checkpoints (truncated, 0 bytes, not a checkpoint)
  with a warning naming each and resumes from the newest readable one.
"""
import io
import logging
import os
import pickle
import tempfile
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts

__all__ = ["UnsafeCheckpointError", "CheckpointMismatchError", "RestrictedUnpickler", "load_checkpoint_file",
           "HierSegCheckpointer", "add_reliability_config", "atomic_torch_save"]

logger = logging.getLogger(__name__)

TRUST_OPTION = "MODEL.WEIGHTS_TRUSTED True"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs more than tensors / numpy arrays / plain containers to be read."""


class CheckpointMismatchError(KeyError):
    """A checkpoint provides too few of the model's tensors."""

    def __str__(self):  # KeyError would print the message with quotes
        return str(self.args[0]) if self.args else ""


# (module, name) globals a Detectron2 / Caffe2 .pkl may reference: numpy arrays and scalars, and the
# containers pickle writes by reference
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy arrays/scalars/dtypes and plain containers; anything else
    raises :class:`UnsafeCheckpointError` naming the global it asked for."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "numpy" and name.endswith("dtype") or module == "numpy.dtypes":
            return super().find_class(module, name)  # numpy >= 1.25 pickles dtypes as numpy.dtypes.*DType
        raise UnsafeCheckpointError(f"global '{module}.{name}' is not allowed")


def _refused(path: str, what: str, how_to_trust: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refusing to load: the file needs more than tensors, numpy arrays and plain containers "
        f"({what}); loading it could run code. If you trust this file, opt in with {how_to_trust}.")


def load_checkpoint_file(path: str, trusted: bool = False, how_to_trust: str = TRUST_OPTION) -> Any:
    """The object stored in the checkpoint file ``path`` (on the CPU).

    ``.pkl``: pickle (latin1, as Detectron2's model zoo) through :class:`RestrictedUnpickler`; anything
    else: ``torch.load(weights_only=True)``. With ``trusted`` the plain pickle / ``torch.load`` is used.
    Errors name the file: :class:`UnsafeCheckpointError` (with ``how_to_trust``) for a file that needs
    more, ``ValueError`` for a file that is not a checkpoint (text, truncated, empty).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: checkpoint file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (or, in the legacy format, a binary pickle): anything else, a text
    # file say, is not a checkpoint at all rather than an unsafe one
    if not path.endswith(".pkl") and not head.startswith((b"PK\x03\x04", b"\x80")):
        raise ValueError(f"{path}: not a readable checkpoint (torch.save or Detectron2 .pkl): it starts with "
                         f"{head!r}, neither a zip archive nor a binary pickle")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                if trusted:
                    return pickle.load(f, encoding="latin1")
                return RestrictedUnpickler(f, encoding="latin1").load()
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except UnsafeCheckpointError as e:
        raise _refused(path, str(e), how_to_trust) from None
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            detail = str(e).split("WeightsUnpickler error:")[-1].strip()
            raise _refused(path, detail, how_to_trust) from None
        raise ValueError(f"{path}: not a readable checkpoint (torch.save or Detectron2 .pkl): "
                         f"{type(e).__name__}: {e}") from None
    except (EOFError, RuntimeError, KeyError, ValueError, UnicodeDecodeError, AttributeError, IndexError,
            TypeError, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (torch.save or Detectron2 .pkl), damaged or "
                         f"truncated? {type(e).__name__}: {e}") from None


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file next to ``path``, flushed to disk, then renamed onto ``path``: a
    kill during the write leaves the previous file (or none), never a partial one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_write_text(text: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add_reliability_config(cfg) -> None:
    """The safety keys (docs/training.md, "Safety and reliability"):

    * ``MODEL.WEIGHTS_TRUSTED``: read checkpoints with full pickle (only for files you trust);
    * ``MODEL.WEIGHTS_MIN_MATCHED``: share of the reference tensors a loaded checkpoint must provide;
    * ``SOLVER.DIVERGENCE_FACTOR``: stop when the total loss exceeds this factor times its running median
      over the last ``SOLVER.DIVERGENCE_WINDOW`` iterations (0: off).
    """
    cfg.MODEL.WEIGHTS_TRUSTED = False
    cfg.MODEL.WEIGHTS_MIN_MATCHED = 0.5
    cfg.SOLVER.DIVERGENCE_FACTOR = 0.0
    cfg.SOLVER.DIVERGENCE_WINDOW = 20


def _few(names: List[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


class HierSegCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with safe loading, a match check, atomic writes and damaged-checkpoint
    fallback on resume (see the module docstring).

    Args:
        trusted: read files with plain pickle (``MODEL.WEIGHTS_TRUSTED``).
        min_matched: share of the reference tensors a loaded file must provide (``MODEL.WEIGHTS_MIN_MATCHED``).
    """

    def __init__(self, model, save_dir="", *, trusted: bool = False, min_matched: float = 0.5,
                 save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.trusted = trusted
        self.min_matched = min_matched
        self._loading: Optional[str] = None

    @classmethod
    def from_config(cls, cfg, model, save_dir="", **kwargs):
        return cls(model, save_dir, trusted=cfg.MODEL.WEIGHTS_TRUSTED, min_matched=cfg.MODEL.WEIGHTS_MIN_MATCHED,
                   **kwargs)

    # ---------------- reading ----------------
    def load(self, path, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None
            self._parsed_url_during_load = None  # Detectron2 leaves it set when a load fails

    def _torch_load(self, f):
        return load_checkpoint_file(f, self.trusted)

    def _load_file(self, filename):
        if filename.endswith(".pkl") or filename.endswith(".pyth"):
            data = load_checkpoint_file(filename, self.trusted)
            if not isinstance(data, dict):
                raise ValueError(f"{filename}: expected a dict in the checkpoint, got {type(data).__name__}")
            if filename.endswith(".pyth"):
                if "model_state" not in data:
                    raise ValueError(f"{filename}: a pycls .pyth checkpoint must contain 'model_state'")
                state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
                return {"model": state, "__author__": "pycls", "matching_heuristics": True}
            # Detectron2's interpretation of model-zoo vs Caffe2 pickles, on the safely read data
            if "model" in data and "__author__" in data:
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = super()._load_file(filename)
        if not isinstance(loaded.get("model"), dict):
            raise ValueError(f"{filename}: expected a state dict (name -> tensor) in the checkpoint")
        return loaded

    def _load_model(self, checkpoint):
        if checkpoint.get("matching_heuristics", False):
            # align first (as Detectron2 does) so that the match check sees the model's names
            self._convert_ndarray_to_tensor(checkpoint["model"])
            checkpoint["model"] = align_and_update_state_dicts(
                self.model.state_dict(), checkpoint["model"],
                c2_conversion=checkpoint.get("__author__", None) == "Caffe2")
            checkpoint["matching_heuristics"] = False
        self._check_match(checkpoint["model"])
        return super()._load_model(checkpoint)

    def _check_match(self, state: Dict[str, Any]) -> None:
        path = self._loading or "checkpoint"
        expected = self.model.state_dict()  # fvcore unwraps DDP: no "module." here
        prefix = ""
        strip = all(k.startswith("module.") for k in state)  # fvcore strips it from the file's names too
        names = {k[len("module."):] if strip else k: v for k, v in state.items()}
        matched = [k for k, v in names.items() if k in expected and hasattr(v, "shape")
                   and tuple(v.shape) == tuple(expected[k].shape)]
        if not matched:
            raise CheckpointMismatchError(
                f"{path}: none of its {len(state)} tensors matches the model (name and shape); first checkpoint "
                f"names: {_few(sorted(state))}; first model names: {_few(sorted(expected))}. Wrong architecture?")
        backbone = prefix + "backbone."
        scope = [k for k in expected if k.startswith(backbone)] if all(k.startswith(backbone) for k in matched) \
            else list(expected)
        matched_set = set(matched)
        share = len(matched_set & set(scope)) / max(len(scope), 1)
        where = "backbone" if len(scope) < len(expected) else "model"
        self.logger.info(f"{path}: {len(matched)} tensors match, {share:.0%} of the {where}'s {len(scope)}")
        if share < self.min_matched:
            missing = sorted(k for k in scope if k not in matched_set)
            unmatched = sorted(k for k in names if k not in matched_set)
            raise CheckpointMismatchError(
                f"{path}: provides only {share:.0%} of the {where}'s {len(scope)} tensors, below "
                f"MODEL.WEIGHTS_MIN_MATCHED = {self.min_matched}; first missing: {_few(missing)}; first "
                f"unmatched in the file: {_few(unmatched) or 'none'}. Set MODEL.WEIGHTS_MIN_MATCHED lower "
                f"(0.0 turns the check off) to load it partially on purpose.")

    # ---------------- writing ----------------
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        _atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    # ---------------- resuming ----------------
    def _resume_candidates(self) -> List[str]:
        """The tagged last checkpoint first, then every other .pth of save_dir, newest first."""
        tagged = self.get_checkpoint_file()
        others = sorted((f for f in self.get_all_checkpoint_files() if f != tagged),
                        key=lambda f: (os.path.getmtime(f), f), reverse=True)
        return ([tagged] if tagged else []) + others

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        skipped = []
        for candidate in self._resume_candidates():
            try:
                load_checkpoint_file(candidate, self.trusted)  # read it whole before touching the model
            except (FileNotFoundError, ValueError) as e:
                self.logger.warning(f"--resume: skipping damaged checkpoint {candidate}: {e}")
                skipped.append(candidate)
                continue
            if skipped:
                self.logger.warning(f"--resume: resuming from {candidate} instead of {skipped[0]}")
            return self.load(candidate)
        raise ValueError(f"--resume: no readable checkpoint in {self.save_dir} (damaged: {_few(skipped)}); "
                         "remove last_checkpoint to start from MODEL.WEIGHTS")
