"""Run the bench/*.py scripts and write one markdown table of their figures to bench/RESULTS.md.

    python bench/run_all.py                  # every script -> bench/RESULTS.md (what `make bench` runs)
    python bench/run_all.py overhead turns   # a subset -> printed, and written only with --output
    python bench/run_all.py overhead --output /tmp/overhead.md

Each script prints ``BENCH-JSON {"bench": name, figure: value, ...}`` lines (``_stack.report``);
every figure, ratios included, becomes one row. The file ends with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "RESULTS.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _os() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                name = line.split("=", 1)[1].strip('"')
                return f"{name}, kernel {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def _postgres() -> str:
    import psycopg

    url = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def _redis() -> str:
    import redis

    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=3).info("server")["redis_version"]
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def machine() -> list[tuple[str, str]]:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        ("Host", platform.node()),
        ("CPU", _cpu_model()),
        ("Cores", str(os.cpu_count())),
        ("RAM", _memory()),
        ("OS", _os()),
        ("Python", platform.python_version()),
        ("PostgreSQL", _postgres()),
        ("Redis", _redis()),
        ("Load average at start (1/5/15 min)", load),
    ]


def run(script: Path) -> tuple[int, list[dict]]:
    """Run one script, echoing its output as it comes; (exit code, its BENCH-JSON records)."""
    print(f"== {script.name}", flush=True)
    process = subprocess.Popen(
        [sys.executable, script.name],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    records = []
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.startswith("BENCH-JSON "):
            records.append(json.loads(line[len("BENCH-JSON ") :]))
    return process.wait(), records


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> int:
    available = {
        p.stem: p for p in sorted(HERE.glob("*.py")) if not p.name.startswith("_") and p.name != "run_all.py"
    }
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benches", nargs="*", metavar="BENCH", help=f"a subset of: {', '.join(available)}")
    parser.add_argument("--output", type=Path, help=f"where to write the table (default {DEFAULT_OUTPUT})")
    args = parser.parse_args()
    unknown = [name for name in args.benches if name.removesuffix(".py") not in available]
    if unknown:
        parser.error(f"unknown bench {', '.join(unknown)}; choose from {', '.join(available)}")
    chosen = [available[name.removesuffix(".py")] for name in args.benches] or list(available.values())
    subset = len(chosen) < len(available)
    # A subset must not replace the full results unless asked to.
    output = args.output or (None if subset else DEFAULT_OUTPUT)

    started = datetime.now(UTC)
    host = machine()
    rows, failures = [], []
    for script in chosen:
        code, records = run(script)
        if code != 0 or not records:
            failures.append(script.name)
            continue
        for record in records:
            name = record.pop("bench")
            rows.extend((name, key, value) for key, value in record.items())
    minutes = (datetime.now(UTC) - started).total_seconds() / 60
    lines = [
        "# Benchmark results",
        "",
        f"Run {started.isoformat(timespec='seconds')} ({minutes:.1f} min): "
        f"{', '.join(script.name for script in chosen)}. How to read them: bench/README.md.",
        "",
        "| bench | figure | value |",
        "|---|---|---|",
        *[f"| {name} | {key} | {_cell(value)} |" for name, key, value in rows],
    ]
    if failures:
        lines += ["", f"**Failed:** {', '.join(failures)} (see the run's output)"]
    lines += ["", "## Machine", "", "| | |", "|---|---|", *[f"| {key} | {value} |" for key, value in host]]
    text = "\n".join(lines) + "\n"
    if output is None:
        print("\n" + text)
        print("(a subset: not written to RESULTS.md; pass --output to keep it)")
    else:
        output.write_text(text)
        print(f"wrote {output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
