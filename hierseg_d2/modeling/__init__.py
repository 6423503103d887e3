from . import backbone  # noqa: F401  (registers backbones)
