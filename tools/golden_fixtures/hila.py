#!/usr/bin/env python
"""Golden fixtures for HILA from the authors' release (github.com/fidler-lab/hila).

    HILA_RELEASE=/work/releases/fidler-lab+hila .venv/bin/python tools/golden_fixtures/hila.py

Builds the release's own backbone classes (``mmseg/models/backbones/hila.py``, ``hila_segformer.py``,
``hila_swin.py``) with small random instantiations, runs them in eval mode and writes
``tests/fixtures/golden/hila_<setting>.pt``: the release's state dict (its own names), the settings, the
inputs and every stage output (res2..res5), at one square (64x64) and one non-square (64x96) input.
``hila_release_layouts.pt`` holds the names and shapes of the full-size release models of our five presets
(as the release's configs build them) and their parameter counts, for the converter tests.

Settings (reduced widths, the release's HILA hyper-parameters otherwise):

* ``mit_s3``: HILASegformer, MiT layout (depths 2,2,2,2), HILA S(3) = ``hila_attn=[[2, 3]]``, as
  ``def_b0_hila`` / ``def_b1_hila`` with the ADE20K configs (info_weights 0.5, 0.5).
* ``mit_s234``: HILASegformer on depths 2,2,6,2 with S(2,3,4) and ``hila_stride=[1, 1, 3, 1]``, as the
  B2 config (stage 3's stride-3 schedule).
* ``swin_s234``: the release's Swin (``def_swin_t_hila``) with ``hila_attn=[1, 2, 3]``,
  ``hila_stride=[1, 1, 2, 1]``, ``hila_mlp_ratios=[2]*4`` and the top-down blocks copied from the last
  block of the stage below (``reinitialize_bottomsa_weights``, what its only config,
  ``reuse_bottomsa_pretraining=True``, does on its first forward).

Every parameter is perturbed after the release's initialisation (zero-initialised relative-position
tables and unit LayerNorms would hide mistakes; the inter-level q / kv weights more, so that the attention
is peaked enough for the logit scale to matter). The release only runs when every lower-level map of a
HILA pair is even (its F.unfold must give exactly H/2 x W/2 patches), hence the sizes.

The release's Swin top-down block toggles its own ``shift_size`` after every call and keeps it across
forward passes (a state a checkpoint does not record); the script resets it to the value after
``reinitialize_bottomsa_weights`` (window // 2) before each forward, so that every forward starts the
same, which is what our stateless implementation computes.

mmcv / mmseg are not needed: the three files are loaded by path with sys.modules stubs for the few names
they import (``mmcv.runner.load_checkpoint``, ``mmseg.models.builder.BACKBONES``,
``mmseg.utils.get_root_logger``).
"""
import importlib.util
import logging
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import release_checkout, release_commit, save_fixture  # noqa: E402

REPO = "fidler-lab/hila"
SIZES = {"square": (64, 64), "nonsquare": (64, 96)}

MIT_COMMON = dict(embed_dims=[8, 12, 16, 24], num_heads=[1, 2, 2, 3], mlp_ratios=[4, 4, 4, 4],
                  sr_ratios=[8, 4, 2, 1], info_weights=(0.5, 0.5), drop_path_rate=0.0,
                  hila_mlp_ratios=[4, 4, 4, 4])
SETTINGS = {
    "mit_s3": dict(family="mit", depths=[2, 2, 2, 2], hila_attn=[[2, 3]], hila_stride=[1, 1, 1, 1], **MIT_COMMON),
    "mit_s234": dict(family="mit", depths=[2, 2, 6, 2], hila_attn=[[1, 2], [2, 3], [3, 4]],
                     hila_stride=[1, 1, 3, 1], **MIT_COMMON),
    "swin_s234": dict(family="swin", embed_dim=6, depths=[2, 2, 6, 2], num_heads=[1, 2, 3, 6], window_size=7,
                      hila_attn=[1, 2, 3], hila_stride=[1, 1, 2, 1], hila_mlp_ratios=[2, 2, 2, 2],
                      info_weights=(0.5, 0.5), drop_path_rate=0.0),
}


def _stub(name, **attrs):
    module = sys.modules.get(name) or types.ModuleType(name)
    module.__path__ = []  # a package, so that submodules and relative imports resolve
    for k, v in attrs.items():
        setattr(module, k, v)
    sys.modules[name] = module
    return module


class _Registry:
    def register_module(self, *args, **kwargs):
        return lambda cls: cls


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_release(root):
    """The release's hila, hila_segformer and hila_swin modules, loaded by path behind stubs."""
    _stub("mmcv")
    _stub("mmcv.runner", load_checkpoint=lambda *a, **k: None)
    _stub("mmseg")
    _stub("mmseg.utils", get_root_logger=lambda *a, **k: logging.getLogger("hila-release"))
    _stub("mmseg.models")
    _stub("mmseg.models.builder", BACKBONES=_Registry())
    _stub("mmseg.models.backbones")
    folder = os.path.join(root, "mmseg", "models", "backbones")
    mods = {}
    for name in ("hila", "hila_segformer", "hila_swin"):
        mods[name] = _load(os.path.join(folder, f"{name}.py"), f"mmseg.models.backbones.{name}")
    return mods


def build(mods, setting):
    cfg = {k: v for k, v in SETTINGS[setting].items() if k != "family"}
    if SETTINGS[setting]["family"] == "mit":
        # HILASegformerWrapper: qkv_bias True, block / stage norms LayerNorm(eps=1e-6), as def_b*_hila
        model = mods["hila_segformer"].HILASegformerWrapper(**cfg)
    else:
        model = mods["hila_swin"].def_swin_t_hila(**cfg)
        model.init_weights()
        model.reinitialize_bottomsa_weights()  # what reuse_bottomsa_pretraining=True does at first forward
    model.eval()  # (the release's Swin.train returns None)
    return model


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # larger inter-level q / kv weights: peaked attention, so that the logit scale shows in the outputs
            scale = 0.5 if "relative_position" in name else 0.3 if "_attn.q." in name or "_attn.kv." in name else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)


def reset_swin_shifts(model):
    for layer in model.layers:
        if layer.bottom_sa is not None:
            layer.bottom_sa[0].shift_size = layer.window_size // 2


# Full-size release models as the configs build them (local_configs/hila/...), for the layouts: {our preset:
# (release class, kwargs)}. B2's config passes depths 2,2,6,2 and hila_stride 1,1,3,1; Swin-T's config sets
# reuse_bottomsa_pretraining, whose top-down blocks are copies of the last block below (MLP ratio 4).
RELEASE_PRESETS = {
    "mit_b0_s3": ("def_b0_hila", dict(hila_attn=[[2, 3]])),
    "mit_b1_s3": ("def_b1_hila", dict(hila_attn=[[2, 3]])),
    "mit_b1_s234": ("def_b1_hila", dict(hila_attn=[[1, 2], [2, 3], [3, 4]])),
    "mit_b2_s234": ("def_b2_hila", dict(depths=[2, 2, 6, 2], hila_attn=[[1, 2], [2, 3], [3, 4]],
                                        hila_stride=[1, 1, 3, 1])),
    "swin_t_s234": ("def_swin_t_hila", dict(hila_attn=[1, 2, 3], hila_stride=[1, 1, 2, 1],
                                            hila_mlp_ratios=[2, 2, 2, 2], drop_path_rate=0.3)),
}


def save_layouts(mods, commit):
    """Names and shapes of the full-size release models' state dicts, and their parameter counts."""
    layouts, counts = {}, {}
    for preset, (cls, kwargs) in RELEASE_PRESETS.items():
        torch.manual_seed(0)
        module = mods["hila_swin"] if cls.startswith("def_swin") else mods["hila_segformer"]
        model = getattr(module, cls)(info_weights=(0.5, 0.5), **kwargs)
        if cls.startswith("def_swin"):
            model.reinitialize_bottomsa_weights()
        layouts[preset] = {k: list(v.shape) for k, v in model.state_dict().items()}
        counts[preset] = sum(p.numel() for p in model.parameters())
        print(f"release {preset}: {counts[preset]} parameters")
    save_fixture("hila_release_layouts", dict(layouts=layouts, parameters=counts), REPO, commit)


def main():
    root = release_checkout("HILA_RELEASE", REPO)
    commit = release_commit(root)
    mods = load_release(root)
    save_layouts(mods, commit)
    for i, setting in enumerate(SETTINGS):
        torch.manual_seed(100 + i)
        model = build(mods, setting)
        perturb(model, 200 + i)
        g = torch.Generator().manual_seed(300 + i)
        inputs, outputs = {}, {}
        for key, (H, W) in SIZES.items():
            x = torch.randn(1, 3, H, W, generator=g)
            if SETTINGS[setting]["family"] == "swin":
                reset_swin_shifts(model)
            with torch.no_grad():
                outs = model(x)
            inputs[key] = x
            outputs[key] = {f"res{k + 2}": o.contiguous() for k, o in enumerate(outs)}
        config = {k: (list(map(list, v)) if k == "hila_attn" and v and isinstance(v[0], list) else
                      list(v) if isinstance(v, (list, tuple)) else v) for k, v in SETTINGS[setting].items()}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        n = sum(p.numel() for p in model.parameters())
        print(f"{setting}: {n} parameters, {len(state)} tensors")
        save_fixture(f"hila_{setting}", dict(config=config, state_dict=state, inputs=inputs, outputs=outputs),
                     REPO, commit)


if __name__ == "__main__":
    main()
