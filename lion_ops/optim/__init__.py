"""The optimizer classes, under the names bitsandbytes.optim uses."""

from .base import to_bitsandbytes_layout
from .lion import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit
from .manager import GlobalOptimManager

__all__ = ["GlobalOptimManager", "Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit",
           "PagedLion32bit", "to_bitsandbytes_layout"]
