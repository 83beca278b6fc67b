"""Write one benchmark's section into BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re

import numpy as np

REPORT = pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `benchmarks/` (`make bench`); each section is replaced by\n"
    "its script. Times are medians of repeated runs; every ratio compares two things\n"
    "measured in the same run on the same machine (2 shared cores: trust ratios, not\n"
    "absolute numbers).\n"
)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"


def write_section(name: str, body: str) -> None:
    text = REPORT.read_text() if REPORT.exists() else HEADER
    stamp = datetime.date.today().isoformat()
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n\n_Measured {stamp} on {machine()}._\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    REPORT.write_text(text)
