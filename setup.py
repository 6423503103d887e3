from setuptools import find_packages, setup

setup(
    name="hierseg_d2",
    version="0.1.0",
    description="Unified panoptic, instance and semantic segmentation by hierarchical clustering (HCFormer) "
    "with hierarchical backbones, on Detectron2",
    packages=find_packages(include=["hierseg_d2", "hierseg_d2.*"]),
    python_requires="==3.10.*",
    # the pinned stack lives in requirements.txt (see README for why each pin)
    install_requires=[],
)
