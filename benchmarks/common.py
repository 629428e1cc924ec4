"""What every benchmark shares: the machine it ran on, markdown tables, the report file, progress bars.

A report is one markdown file in the results dir (benchmarks/results/ by default) that starts with the
exact command line, the machine (CPU model and cores, torch threads, GPU) and the UTC date, then the
benchmark's tables and its PNG plots (written beside it).
"""

from __future__ import annotations

import math
import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workers.engine.config import DEFAULT_METHOD, METHODS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEQUENTIAL = "_seq"  # TOFU "<method>_seq": that method, one request per forget author, fused in turn
# every method in one request (the default first); the default, eul and npo also in sequential requests
TOFU_METHODS = (DEFAULT_METHOD, *(m for m in METHODS if m != DEFAULT_METHOD),
                *(m + SEQUENTIAL for m in dict.fromkeys((DEFAULT_METHOD, "eul", "npo"))))
# the public TOFU data the project keeps in ../shared/data/tofu beside the checkout; UNLEARN_TOFU_DIR overrides
DEFAULT_TOFU_DIR = Path(os.environ.get("UNLEARN_TOFU_DIR") or Path(__file__).resolve().parents[2] / "shared/data/tofu")
console = Console(stderr=True)


def command_line() -> str:
    """The command as typed: `unlearn bench ...` when run through the console script."""
    program = Path(sys.argv[0]).name
    if program in ("unlearn", "__main__.py", "cli.py"):
        program = "unlearn"
    return " ".join([program, *map(shlex.quote, sys.argv[1:])])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return info


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class MachineLoad:
    """1-minute load averages around a run. A run is noisy when something else was busy when it started (load
    above half the cores): its figures are then not results (published serving figures were once 15x off for
    that reason). The load after is recorded too; it is mostly the run's own (a server, its clients), so it
    is shown, not judged."""

    before: float
    after: float
    cores: int

    @property
    def noisy(self) -> bool:
        return self.before > self.cores / 2

    def line(self) -> str:
        verdict = "NOISY: the machine was busy, these figures are not results" if self.noisy else "idle machine"
        return f"load average (1 min) before {self.before:.2f}, after {self.after:.2f} on {self.cores} cores: {verdict}"


def load_average() -> float:
    return os.getloadavg()[0]


def machine_line() -> str:
    m = machine()
    return (f"{m['cpu']}, {m['cores']} cores visible (torch threads {m['torch_threads']}), GPU: {m['gpu']}; "
            f"torch {m['torch']}, Python {m['python']}")


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e6):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """One benchmark's results file: name.md (+ name*.png written by the benchmark itself)."""

    name: str
    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)  # (heading, markdown body)
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers, also written as name.json
    load: MachineLoad | None = None  # set by the runner around the whole benchmark

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))

    def render(self, command: str, machine_text: str, date: str) -> str:
        noisy = " (NOISY)" if self.load is not None and self.load.noisy else ""
        head = [f"# {self.title}{noisy}", "", f"- command: `{command}`", f"- machine: {machine_text}",
                f"- date: {date}"] + ([f"- {self.load.line()}"] if self.load is not None else []) + [""]
        body = [f"## {heading}\n\n{text}\n" for heading, text in self.sections]
        return "\n".join(head + body)

    def write(self, out_dir: Path) -> Path:
        import json

        out_dir.mkdir(parents=True, exist_ok=True)
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = command_line()
        path = out_dir / f"{self.name}.md"
        path.write_text(self.render(command, machine_line(), date), encoding="utf-8")
        meta = {"command": command, "machine": machine(), "date": date, "data": self.data,
                "load": None if self.load is None else {"before": self.load.before, "after": self.load.after,
                                                        "cores": self.load.cores, "noisy": self.load.noisy}}
        (out_dir / f"{self.name}.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
        return path


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A rich progress display on stderr (bars, counts, elapsed); transient=False so logs keep it."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console) as bar:
        yield bar


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between order statistics."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
