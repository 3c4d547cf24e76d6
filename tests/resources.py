"""What the machine running the tests has to spare, for tests that need a lot of it."""

import torch


def free_memory_bytes(device):
    """Free memory on `device`: the GPU's free memory, or the host's MemAvailable (0 where
    /proc/meminfo does not say, so that the tests needing much of it skip)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0
