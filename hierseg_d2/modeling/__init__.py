from . import backbone  # noqa: F401  (registers backbones)
from . import heads, meta_arch, transformer_decoder  # noqa: F401  (register HCFormer's head, meta-arch, decoder)
from .clustering import ClusteringModule, compose_hard_assignments, decode, decode_hierarchy, local_clustering  # noqa: F401
from .criterion import SetCriterion  # noqa: F401
from .matcher import HungarianMatcher  # noqa: F401
