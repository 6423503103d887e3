"""The part of checkpoint conversion that every backbone family shares (used by ``tools/convert-*-to-d2.py``).

An authors' checkpoint is read (:func:`load_state_dict`: .pth or .pkl, unwrapped from "model" /
"state_dict" / "model_ema"), split into the backbone tensors and the ones dropped on purpose
(:func:`split_state_dict`: ``module.`` / ``backbone.`` prefixes stripped, ImageNet heads dropped, any other
name an error naming it), mapped by the family's own function (which lives in the family's module, next to
the names it maps) and written as a Detectron2 checkpoint (:func:`save_d2_checkpoint`): {"model":
{"backbone.<name>": tensor}, "__author__": ..., "matching_heuristics": False}, numpy arrays in a .pkl as in
Detectron2's model zoo, tensors in a .pth. With "matching_heuristics" False, DetectionCheckpointer loads the
names exactly as they are, so the "backbone." prefix makes them load strictly into a full model.
"""
import argparse
import pickle
from contextlib import contextmanager
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["strip_prefixes", "unwrap_state_dict", "load_state_dict", "split_state_dict", "add_prefix",
           "check_against_model", "save_d2_checkpoint", "print_kept_at_initialisation", "naming_file",
           "converter_parser"]

StateDict = Dict[str, torch.Tensor]

_WRAPPERS = ("model", "state_dict", "model_ema")
_PREFIXES = ("module.", "backbone.")


def strip_prefixes(name: str) -> str:
    """``name`` without a leading ``module.`` (DataParallel) or ``backbone.`` (mmseg/mmdet) prefix."""
    for p in _PREFIXES:
        name = name[len(p):] if name.startswith(p) else name
    return name


def unwrap_state_dict(obj, source: str = "checkpoint") -> StateDict:
    """The name -> tensor dict inside ``obj``, unwrapping "model" / "state_dict" / "model_ema" entries
    (numpy arrays become tensors). ``source`` names the file in the error raised for anything else."""
    while isinstance(obj, Mapping):
        inner = next((obj[w] for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or \
            not all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
        raise ValueError(f"{source}: expected a state dict (name -> tensor), possibly under 'model' or "
                         f"'state_dict'; got {type(obj).__name__}")
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}


def load_state_dict(path: str, trusted: bool = False) -> StateDict:
    """The state dict of a .pth or .pkl checkpoint file, see :func:`unwrap_state_dict`. Read safely by
    :func:`hierseg_d2.checkpoint.load_checkpoint_file` (tensors / numpy arrays / plain containers only);
    ``trusted`` (the converters' ``--trusted``) allows full pickle for files you trust."""
    from ...checkpoint import load_checkpoint_file

    obj = load_checkpoint_file(path, trusted=trusted, how_to_trust="--trusted (the converter's flag)")
    return unwrap_state_dict(obj, str(path))


def split_state_dict(state_dict: Mapping[str, torch.Tensor], keep: Tuple[str, ...], drop: Tuple[str, ...] = (),
                     drop_suffixes: Tuple[str, ...] = (), layout: str = "the authors'"
                     ) -> Tuple[StateDict, List[str]]:
    """(backbone tensors under their names without ``module.``/``backbone.``, names dropped on purpose).

    A (stripped) name starting with one of ``drop`` or ending with one of ``drop_suffixes`` is dropped and
    its original name listed; one starting with one of ``keep`` is kept; any other raises ``KeyError``
    naming it and ``layout``.
    """
    kept, dropped = {}, []
    for name, tensor in state_dict.items():
        key = strip_prefixes(name)
        if key.startswith(drop) or (drop_suffixes and key.endswith(drop_suffixes)):
            dropped.append(name)
        elif key.startswith(keep):
            kept[key] = tensor
        else:
            raise KeyError(f"checkpoint tensor {name!r} is not part of {layout} layout "
                           f"(expected names starting with {keep + drop})")
    if not kept:
        raise KeyError(f"checkpoint holds no backbone tensors of {layout} layout (names starting with {keep})")
    return kept, dropped


def add_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "backbone.") -> StateDict:
    return {prefix + k: v for k, v in state_dict.items()}


def check_against_model(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str,
                        allow_missing: bool = False) -> List[str]:
    """Compare ``converted`` with a model's state dict ``expected`` (same naming).

    Unexpected names and shape mismatches raise, naming the tensors; missing names raise too unless
    ``allow_missing`` (then they are returned sorted: the model's new parameters, kept at initialisation).
    """
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if unexpected or (missing and not allow_missing):
        raise KeyError(f"{what} does not match the model: "
                       + (f"missing {_few(missing)}, " if not allow_missing else "")
                       + f"unexpected {_few(unexpected)}")
    for name, value in converted.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(f"{what}: tensor {name!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
    return missing


def _few(names: Sequence[str], n: int = 10) -> str:
    return f"{list(names[:n])}{' ...' if len(names) > n else ''}"


def save_d2_checkpoint(converted: Mapping[str, torch.Tensor], path: str, author: str) -> dict:
    """Write ``converted`` (names already prefixed) as a Detectron2 checkpoint and return what was written:
    a .pkl holds numpy arrays (Detectron2's model-zoo format), anything else is written with torch.save."""
    out = {"__author__": author, "matching_heuristics": False}
    if str(path).endswith(".pkl"):
        out["model"] = {k: v.detach().cpu().numpy() for k, v in converted.items()}
        with open(path, "wb") as f:
            pickle.dump(out, f)
    else:
        out["model"] = dict(converted)
        torch.save(out, path)
    print(f"wrote {len(converted)} tensors to {path}")
    return out


def print_kept_at_initialisation(names: Iterable[str], why: Optional[str] = None) -> None:
    """List the model parameters the checkpoint does not provide (they keep their initialisation)."""
    names = list(names)
    if names:
        print(f"kept at initialisation ({len(names)} tensors{', ' + why if why else ''}):")
        for name in names:
            print(f"  {name}")


@contextmanager
def naming_file(path: str):
    """Re-raise a KeyError / ValueError of the conversion with ``path`` in front of its message."""
    try:
        yield
    except (KeyError, ValueError) as e:
        raise type(e)(f"{path}: {e.args[0] if e.args else e}") from None


def converter_parser(description: str, source_help: str, check_config_help: Optional[str] = None
                     ) -> argparse.ArgumentParser:
    """The command line every ``tools/convert-*-to-d2.py`` starts from: ``source output``; with
    ``check_config_help`` also ``--config-file`` / ``--opts`` naming the model the result is checked against."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help=source_help)
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pkl: numpy arrays, else torch.save)")
    parser.add_argument("--trusted", action="store_true",
                        help="read the source with full pickle (can run code: only for files you trust)")
    if check_config_help:
        parser.add_argument("--config-file", default="", help=check_config_help)
        parser.add_argument("--opts", default=[], nargs="*", help="'KEY VALUE' pairs for --config-file")
    return parser
