"""Meta-architectures registered in Detectron2's META_ARCH_REGISTRY."""
from .hcformer import HCFormer
