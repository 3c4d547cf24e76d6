"""lion_ops: the Lion optimizer family of bitsandbytes, as native torch.library operators.

    from lion_ops import Lion
    optimizer = Lion(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)

The operators are also available directly as torch.ops.lion.* (see lion_ops.ops).
"""

from . import ops  # loads the native library and registers the fakes
from . import optim
from . import quantization
from .optim import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit

__all__ = ["Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit", "ops",
           "optim", "quantization"]
__version__ = "0.1.0"
