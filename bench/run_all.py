"""Run every bench/*.py script and write one markdown table of its figures to bench/RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f", {int(line.split()[1]) // 1024 // 1024} GiB RAM"
    except OSError:
        pass
    system = f"{platform.platform()}, Python {platform.python_version()}"
    return f"{platform.node()}: {os.cpu_count()} cores{memory}, {system}"


def main() -> int:
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py")
    rows, failures = [], []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        result = subprocess.run([sys.executable, script.name], cwd=HERE, capture_output=True, text=True)
        print(result.stdout[-4000:], end="")
        figures = [
            json.loads(line[len("BENCH-JSON ") :])
            for line in result.stdout.splitlines()
            if line.startswith("BENCH-JSON ")
        ]
        if result.returncode != 0 or not figures:
            failures.append(script.name)
            print(result.stderr[-4000:], file=sys.stderr)
            continue
        for record in figures:
            name = record.pop("bench")
            rows.extend((name, key, value) for key, value in record.items())
    lines = [
        "# Benchmark results",
        "",
        f"Run {datetime.now(UTC).isoformat(timespec='seconds')} on {machine()}.",
        "",
        "| bench | figure | value |",
        "|---|---|---|",
        *[
            f"| {name} | {key} | {value:.4g} |"
            if isinstance(value, float)
            else f"| {name} | {key} | {value} |"
            for name, key, value in rows
        ],
    ]
    if failures:
        lines += ["", f"Failed: {', '.join(failures)}"]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
