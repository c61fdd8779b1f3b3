"""AGD inside other libraries' trainers. Each submodule imports its library and is imported
only on demand (``import torch_agd`` needs torch alone): ``torch_agd.integrations.torchtitan``."""
