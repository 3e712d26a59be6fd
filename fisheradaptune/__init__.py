"""fisheradaptune: Fisher-guided, task-aware parameter-efficient fine-tuning as fast PyTorch ops.

``import fisheradaptune`` loads the compiled operators (``torch.ops.fisheradaptune.*``) and
exposes the Python API built on them; the public API is exactly ``__all__``. Where the compiled
library is missing or cannot load (or ``FISHERADAPTUNE_FALLBACK=1`` is set), the same ops are
registered with pure-PyTorch kernels instead and one :class:`FallbackWarning` says why;
:func:`has_compiled_ops` says which is running. The demo (``python -m fisheradaptune.demo``)
is not imported.
"""
from ._loader import FallbackWarning, has_compiled_ops, has_cuda_kernels

# Importing ops loads the operators (compiled, or the fallback's schemas and kernels) and
# registers every Python kernel of the ops (fake, autograd, ADInplaceOrView), once.
from . import ops, reference, groups, fisher  # noqa: E402
from . import adapters, vit, selection, masked, distributed, adaptune  # noqa: E402
from .groups import GroupLayout  # noqa: E402
from .adaptune import FisherAdapTune, Observe, PaperPolicy, Policy, Threshold  # noqa: E402
from .fisher import Estimator, register_estimator  # noqa: E402
from .masked import MaskedOptimizer  # noqa: E402
from ._wrapped import WrappedOptimizer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ops", "reference", "groups", "fisher", "adaptune", "adapters", "vit", "selection",
           "masked", "distributed", "GroupLayout", "FisherAdapTune", "MaskedOptimizer", "WrappedOptimizer",
           "Policy", "Threshold", "PaperPolicy", "Observe", "Estimator", "register_estimator",
           "has_cuda_kernels", "has_compiled_ops", "FallbackWarning", "__version__"]
