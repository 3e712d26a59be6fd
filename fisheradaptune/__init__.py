"""fisheradaptune: Fisher-guided, task-aware parameter-efficient fine-tuning as fast PyTorch ops.

``import fisheradaptune`` loads the compiled operators (``torch.ops.fisheradaptune.*``) and
exposes the Python API built on them.
"""
from ._loader import has_cuda_kernels, load as _load

_load()

from . import ops, reference, groups, fisher  # noqa: E402  (ops need the library loaded)
from . import adapters, models  # noqa: E402
from . import vit  # noqa: E402
from .groups import GroupLayout  # noqa: E402
from .adaptune import PaperPolicy, Policy, Threshold  # noqa: E402
from .optim import FisherAdapTune  # noqa: E402
from . import distributed, selection  # noqa: E402
from .masked import MaskedOptimizer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ops", "reference", "groups", "fisher", "adapters", "models", "vit", "GroupLayout", "FisherAdapTune", "MaskedOptimizer", "selection", "distributed", "Threshold",
           "PaperPolicy", "Policy", "has_cuda_kernels", "__version__"]
