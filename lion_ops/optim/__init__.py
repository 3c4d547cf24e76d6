"""The optimizer classes, under the names bitsandbytes.optim uses."""

from .lion import Lion, Lion8bit, Lion32bit

__all__ = ["Lion", "Lion8bit", "Lion32bit"]
