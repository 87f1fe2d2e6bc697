"""`emailpers check`: render a deterministic sample of a campaign's
recipients through the normal render path into a folder, then lint the
templates and every message (emailpers.lint).

Where the sample's data comes from: fixtures (--replay, or [preview]
fixtures), the cache (--offline), or the live APIs.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emailpers import amp
from emailpers.campaign import Campaign
from emailpers.errors import CampaignError
from emailpers.fixtures import NO_FIXTURE
from emailpers.lint import ERROR, WARNING, Finding, lint_amp, lint_message, lint_template
from emailpers.pipeline import RunOptions, render_campaign
from emailpers.recipients import read_recipients
from emailpers.render import Renderer, toml_where
from emailpers.report import Report

DEFAULT_SAMPLE = 20
SAMPLE_FILE = "sample.jsonl"
# The [campaign] key a message finding is about: annotations land on its line.
_RULE_KEYS = {"subject": "subject", "from-domain": "from", "preheader": "preheader",
              "list-unsubscribe": "headers", "list-unsubscribe-post": "headers"}


@dataclass(frozen=True)
class CheckResult:
    recipients: list[str]  # the sample's ids, in file order
    findings: list[Finding]
    report: Report  # the render's report
    data_from: str  # "fixtures in DIR", "the cache", "the live APIs"
    out: Path

    @property
    def errors(self) -> int:
        return sum(f.severity == ERROR for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == WARNING for f in self.findings)

    def failed(self, strict: bool) -> bool:
        return bool(self.errors or (strict and self.warnings))


def _rank(recipient_id: str) -> str:
    return hashlib.sha256(recipient_id.encode("utf-8")).hexdigest()


def sample_rows(campaign: Campaign, size: int, only: Sequence[str] = ()) -> list[dict[str, Any]]:
    """`size` usable rows chosen by a hash of their id: the same sample on every
    run and machine, spread over the whole file. `only` picks those ids instead."""
    rows = ((row.number, row.id, row.fields) for row in read_recipients(campaign.recipients)
            if row.problem is None and row.id is not None)
    if only:
        wanted = dict.fromkeys(only)
        chosen = [r for r in rows if r[1] in wanted]
        missing = [i for i in wanted if i not in {r[1] for r in chosen}]
        if missing:
            raise CampaignError(f"{campaign.recipients.name}: no usable recipient with id "
                                + ", ".join(repr(i) for i in missing) + " (given by --only)")
    else:
        chosen = heapq.nsmallest(size, rows, key=lambda r: _rank(str(r[1])))
    seen: set[str] = set()
    picked = []
    for _number, rid, fields in sorted(chosen, key=lambda r: r[0]):
        if rid not in seen:
            seen.add(str(rid))
            picked.append(fields)
    return picked


def shown_path(path: Path | str) -> str:
    """A path as annotations want it: relative to the working folder (the
    repository root in CI) when it is under it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def sample_campaign(campaign: Campaign) -> Campaign:
    """The campaign as check and preview render it: nothing is sent, so its
    AMP part goes unvalidated (a warning) where no validator can be had, and
    amp_url signs with a throwaway key where the real one is not set."""
    config = campaign.amp
    if config is None:
        return campaign
    if config.key_env and not config.key:
        config = replace(config, key=secrets.token_bytes(32))
    if config.validate:
        try:
            amp.check_available()
        except amp.ValidatorUnavailable:
            config = replace(config, validate=False)
    return replace(campaign, amp=config)


def render_sample(campaign: Campaign, rows: list[dict[str, Any]], out: Path, *, replay: Path | None,
                  offline: bool, cache_dir: Path | None, record: Path | None = None) -> Report:
    """Render `rows` of `campaign` into `out` (started over) and return the report."""
    out.mkdir(parents=True, exist_ok=True)
    sample = out / SAMPLE_FILE
    sample.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    recipients = replace(campaign.recipients, path=sample, format="jsonl", gzip=False, delimiter=",",
                         encoding="utf-8", label=f"{campaign.recipients.name} (sample)")
    options = RunOptions(out=out, workers=0, fresh=True, max_error_rate=None, replay=replay, record=record,
                         offline=offline, use_cache=offline, cache_dir=cache_dir)
    return render_campaign(replace(campaign, recipients=recipients), options)


def _where(campaign: Campaign, finding: Finding) -> Finding:
    """A message finding pointed at the campaign key or template it comes from."""
    key = _RULE_KEYS.get(finding.rule)
    if key is not None:
        found = re.fullmatch(r"(.*):(\d+)", toml_where(campaign.path, "campaign", key))
        if found:
            return replace(finding, file=shown_path(found.group(1)), line=int(found.group(2)))
        return replace(finding, file=shown_path(campaign.path))
    if finding.rule == "text-part" and campaign.text_template is not None:
        return replace(finding, file=shown_path(campaign.text_template))
    return replace(finding, file=shown_path(campaign.template))


def lint_output(campaign: Campaign, out: Path) -> list[Finding]:
    """Findings for the templates, then for every recipient in `out`'s manifest."""
    findings: list[Finding] = []
    for path in sorted(Renderer(campaign).template_files):
        findings += lint_template(shown_path(path), path.read_text(encoding="utf-8"))
    for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        rid = entry.get("id")
        if entry["status"] in ("failed", "skipped", "invalid"):
            findings.append(Finding("render", ERROR, f"{entry['status']}: {entry.get('error')}",
                                    shown_path(campaign.template), None, rid))
            continue
        for name in entry["files"]:
            if name.endswith(".eml"):
                for finding in lint_message((out / name).read_bytes(), recipient=rid):
                    findings.append(_where(campaign, finding))
        if campaign.amp is not None:
            findings += lint_amp(entry, recipient=rid, file=shown_path(campaign.amp.template))
    return findings


def check_sample(campaign: Campaign, out: Path, *, size: int = DEFAULT_SAMPLE, only: Sequence[str] = (),
                 replay: Path | None = None, offline: bool = False, cache_dir: Path | None = None) -> CheckResult:
    campaign = sample_campaign(campaign)
    rows = sample_rows(campaign, size, only)
    if not rows:
        raise CampaignError(f"{campaign.recipients.name}: no usable recipient to check")
    report = render_sample(campaign, rows, out, replay=replay, offline=offline, cache_dir=cache_dir)
    data_from = f"fixtures in {shown_path(replay)}" if replay is not None else "the cache" if offline else "the live APIs"
    ids = [str(r[campaign.recipients.id_field]) for r in rows]
    findings = lint_output(campaign, out)
    for name, figures in report.sources.items():
        missing = figures.error_kinds.get(NO_FIXTURE)
        if replay is not None and missing:
            findings.append(Finding("fixtures", WARNING, f"source {name}: {missing} requests had no fixture in "
                                    f"{shown_path(replay)}; those recipients show the fallback (record them with "
                                    "render --record)", shown_path(campaign.path)))
    return CheckResult(ids, findings, report, data_from, out)


# -- output ---------------------------------------------------------------------------


def grouped(findings: Sequence[Finding]) -> list[tuple[Finding, list[str]]]:
    """Findings alike but for the recipient, once each with the recipients."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    first: dict[tuple[Any, ...], Finding] = {}
    for f in findings:
        key = (f.rule, f.severity, f.message, f.file, f.line)
        first.setdefault(key, f)
        groups.setdefault(key, [])
        if f.recipient is not None:
            groups[key].append(f.recipient)
    return [(first[k], groups[k]) for k in first]


def _recipients(ids: list[str]) -> str:
    if not ids:
        return ""
    shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
    return f" (recipient{'s' if len(ids) > 1 else ''} {shown})"


def text_lines(result: CheckResult) -> list[str]:
    lines = []
    for f, ids in grouped(result.findings):
        where = f"{f.file}:{f.line}" if f.line else f"{f.file}"
        lines.append(f"{where}: {f.severity} [{f.rule}] {f.message}{_recipients(ids)}")
    lines.append(f"Checked {len(result.recipients)} recipients with data from {result.data_from}: "
                 f"{result.errors} errors, {result.warnings} warnings")
    return lines


def _escape(value: str, *, property_: bool = False) -> str:
    value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return value.replace(":", "%3A").replace(",", "%2C") if property_ else value


def github_lines(result: CheckResult) -> list[str]:
    """GitHub Actions workflow commands: each finding lands on its file and line in the pull request."""
    lines = []
    for f, ids in grouped(result.findings):
        props = [f"file={_escape(f.file or '', property_=True)}"]
        if f.line:
            props.append(f"line={f.line}")
        props.append(f"title={_escape(f'emailpers {f.rule}', property_=True)}")
        lines.append(f"::{f.severity} {','.join(props)}::{_escape(f.message + _recipients(ids))}")
    return lines


def json_value(result: CheckResult) -> dict[str, Any]:
    return {
        "recipients": result.recipients,
        "data_from": result.data_from,
        "errors": result.errors,
        "warnings": result.warnings,
        "findings": [f.as_dict() for f in result.findings],
        "render": dict(result.report.this_run),
    }
