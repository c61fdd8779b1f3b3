"""torch-agd: Automatic Gradient Descent for PyTorch (Bernstein et al., arXiv:2304.05187)."""
from .errors import UsageError
from .init import init_weights_
from .optim import AGD

__version__ = "0.1.0"
__all__ = ["AGD", "init_weights_", "UsageError", "__version__"]
