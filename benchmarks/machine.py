"""What every benchmark prints first: the machine its numbers come from."""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (f"{platform.node()}: {os.cpu_count()} CPUs, {model}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}{load}")
