"""Append one benchmark table to bench/RESULTS.md with the time, the machine and the command."""

import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def append(script: str, command: str, table: str) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
        f.write(f"\n### {script}: {stamp} ({machine})\n\n`{command}`\n\n{table}\n")
