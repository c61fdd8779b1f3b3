"""torch-agd: Automatic Gradient Descent for PyTorch (Bernstein et al., arXiv:2304.05187)."""
from .errors import UsageError
from .optim import AGD, Rule, agd, init_weights_, register_rule

__version__ = "0.1.0"
__all__ = ["AGD", "agd", "init_weights_", "register_rule", "Rule", "UsageError", "__version__"]
