"""Shards: N copies of one run, started by a job runner (a Kubernetes Indexed
Job, an AWS Batch array, a Slurm array, a CI matrix, GNU parallel), each
doing the recipients whose id hashes to its index.

The hash is SHA-256 of the id's UTF-8 bytes, its first 8 bytes as a big-endian
integer, modulo N: the same on every machine and Python version (Python's own
hash() is salted per process). A row without a usable id (an invalid row) goes
to the shard of its line number, so it is recorded exactly once too.

The shards of one run share one output folder:

    OUT/run.json                    the campaign fingerprint and N, written by the first shard
    OUT/messages/                   every shard's message files (ids are disjoint)
    OUT/shards/K-of-N.jsonl         shard K's journal (its manifest)
    OUT/shards/K-of-N.report.json   shard K's latest report, with its exit code
    OUT/shards/K-of-N.lock          held while shard K runs
    OUT/shards/K-of-N.sent.jsonl    `send --shard K/N`'s journal (journal.py), and .send-report.json

`status()` reads them all back for `emailpers status OUT`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emailpers.errors import CampaignError, OutputError
from emailpers.output import MANIFEST, REPORT, whole_lines

SHARDS = "shards"
RUN = "run.json"  # the campaign fingerprint an output folder was started with (manifest.py)
# The runners' index variables, in the order they are tried, and their base.
INDEX_VARIABLES: tuple[tuple[str, int], ...] = (
    ("JOB_COMPLETION_INDEX", 0),  # Kubernetes Indexed Job
    ("AWS_BATCH_JOB_ARRAY_INDEX", 0),  # AWS Batch array job
    ("SLURM_ARRAY_TASK_ID", 0),  # Slurm array: start it at 0 (--array=0-(N-1))
    ("CI_NODE_INDEX", 1),  # GitLab CI parallel: 1..N
)
_SPEC = re.compile(r"(\d+|auto)/(\d+)")


def shard_of(recipient_id: str, count: int) -> int:
    """The shard (0..count-1) a recipient id belongs to."""
    digest = hashlib.sha256(recipient_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int
    source: str = ""  # the environment variable the index came from (auto), for the user

    @property
    def name(self) -> str:
        return f"{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, recipient_id: str) -> bool:
        return shard_of(recipient_id, self.count) == self.index

    def owns_row(self, number: int) -> bool:
        """An invalid row (no usable id): by its line number."""
        return number % self.count == self.index

    def owns_file(self, name: str) -> bool | None:
        """Whether a message file (`messages/NAME`) is one of this shard's; None
        when its name does not tell (a long unusual id, stored as a hash)."""
        recipient_id = stem_id(name.rsplit(".", 1)[0])
        return None if recipient_id is None else self.owns(recipient_id)

    def journal(self, out: Path) -> Path:
        return out / SHARDS / f"{self.name}.jsonl"

    def report(self, out: Path) -> Path:
        return out / SHARDS / f"{self.name}.report.json"

    def lock(self, out: Path) -> Path:
        return out / SHARDS / f"{self.name}.lock"


def stem_id(stem: str) -> str | None:
    """The id whose file name `output.file_stem` made `stem`, where the name
    holds it (everything but `~h` + a SHA-256)."""
    if stem.startswith("~h") and len(stem) == 66:
        return None
    if stem.startswith("~"):
        encoded = stem[1:].upper()
        try:
            return base64.b32decode(encoded + "=" * (-len(encoded) % 8)).decode("utf-8", "surrogatepass")
        except (binascii.Error, ValueError):
            return None
    return stem.split("~", 1)[0]


def parse_shard(spec: str, env: Mapping[str, str]) -> Shard:
    """`K/N` (K from 0) or `auto/N`: K from the first runner variable set in
    `env`. Raises CampaignError naming what is wrong and what to do."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None:
        raise CampaignError(f"--shard {spec!r}: write K/N (K from 0 to N-1) or auto/N")
    count = int(match.group(2))
    if count < 1:
        raise CampaignError(f"--shard {spec}: N must be at least 1")
    if match.group(1) != "auto":
        index, source = int(match.group(1)), ""
    else:
        found = [(name, base) for name, base in INDEX_VARIABLES if env.get(name, "").strip()]
        if not found:
            names = ", ".join(name for name, _ in INDEX_VARIABLES)
            raise CampaignError(f"--shard auto/{count}: none of {names} is set; give the index as --shard K/{count}")
        name, base = found[0]
        value = env[name].strip()
        if not value.isdigit():
            raise CampaignError(f"--shard auto/{count}: {name}={value!r} is not an index")
        index, source = int(value) - base, name
    if not 0 <= index < count:
        where = f" ({source}={env[source].strip()})" if source else ""
        raise CampaignError(f"--shard {spec}: index {index}{where} is not between 0 and {count - 1}")
    return Shard(index, count, source)


# -- status ---------------------------------------------------------------------------


@dataclass
class ShardStatus:
    name: str  # "main" for an unsharded run's manifest, else K-of-N
    counts: dict[str, int] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # its latest report.json, None if it never finished one
    problem: str | None = None  # why this shard keeps the run from being done

    @property
    def exit_code(self) -> int | None:
        if self.report is None:
            return None
        code = self.report.get("exit_code")
        return code if isinstance(code, int) else None


def _journal_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for number, line in whole_lines(path, cut_torn=False):  # a line cut off by a kill: that recipient is redone
        try:
            status = json.loads(line)["status"]
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"{path}:{number}: not a manifest line") from None
        counts[status] = counts.get(status, 0) + 1
    return counts


def run_shards(out: Path) -> int | None:
    """N when shards started `out` (its run.json says so), else None."""
    try:
        run = json.loads((out / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    count = run.get("shards") if isinstance(run, dict) else None
    return count if isinstance(count, int) else None


def status(out: Path) -> tuple[list[ShardStatus], int]:
    """Every shard's journal and report in `out`, and the exit code the whole
    run deserves: the worst shard's, 1 while a shard has not finished (never
    started, still running, killed) or when shards of different N share the folder."""
    try:
        run = json.loads((out / RUN).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{out}: no {RUN} here; is it the --out of an emailpers render?") from None
    except ValueError:
        raise OutputError(f"{out / RUN}: not a run file") from None
    count = run.get("shards") if isinstance(run, dict) else None
    found: list[ShardStatus] = []
    if not isinstance(count, int):
        found.append(ShardStatus("main", _journal_counts(out / MANIFEST), _read_report(out / REPORT)))
    else:
        for index in range(count):
            shard = Shard(index, count)
            found.append(ShardStatus(shard.name, _journal_counts(shard.journal(out)), _read_report(shard.report(out))))
        strays = sorted(p.name for p in (out / SHARDS).glob("*.jsonl") if not p.name.endswith(f"-of-{count}.jsonl"))
        if strays:
            found.append(ShardStatus("other", problem=f"journals of another shard count: {', '.join(strays)}"))
    for s in found:
        if s.problem is None and s.report is None:
            s.problem = "never started" if not s.counts else "not finished (running, or killed): run it again"
        elif s.problem is None and s.exit_code is None:
            s.problem = "its report has no exit code"
    worst = max((s.exit_code or 0 for s in found), default=0)
    if any(s.problem for s in found) and worst in (0, 3):  # a stop (4, 130, ...) says more than "unfinished"
        worst = 1
    return found, worst


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return report if isinstance(report, dict) else None
