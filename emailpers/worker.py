"""The render processes: Jinja, MJML, the .eml, the file write.

Kept apart from pipeline.py so a spawned render process imports only what it
needs (no aiohttp, no diskcache: that import was 0.27 s of 0.33 s per process).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emailpers.amp import AmpLink
from emailpers.campaign import Campaign
from emailpers.errors import OutputError, RenderFailed
from emailpers.output import Envelope, write_message
from emailpers.processes import bind_to_parent
from emailpers.render import Renderer

Job = tuple[str, str, dict[str, Any], dict[str, Any], dict[str, str], AmpLink | None]  # the arguments of RenderJob


@dataclass(frozen=True)
class Served:
    status: str
    fallback_blocks: list[dict[str, Any]]
    files: list[str]
    error: str | None
    amp: dict[str, Any] | None = None  # the AMP part's outcome, for the manifest line


class RenderJob:
    """Render one recipient and write its files. Built once per process."""

    def __init__(self, campaign: Campaign, out: Path, formats: str) -> None:
        self.renderer = Renderer(campaign)
        self.envelope = Envelope.parse(campaign.from_)
        self.out = out
        self.formats = formats

    def __call__(
        self,
        rid: str,
        to: str,
        fields: dict[str, Any],
        data: dict[str, Any],
        failures: dict[str, str],
        amp_link: AmpLink | None = None,
    ) -> Served:
        try:
            message = self.renderer.render(fields, data, failures, amp_link)
            files = write_message(self.out, rid, to, message, self.formats, self.envelope)
        except RenderFailed as exc:
            return Served("failed", [], [], str(exc))
        except OutputError:
            raise  # the disk refused a message file: that stops the run, see write_message
        except Exception as exc:  # noqa: BLE001 - one recipient must never stop the run
            return Served("failed", [], [], f"unexpected error while rendering: {type(exc).__name__}: {exc}")
        fell_back = message.used_fallback_template or bool(message.fallback_blocks)
        return Served("fallback" if fell_back else "rendered", message.fallback_blocks, files, None, message.amp_outcome)


_job: RenderJob | None = None


def init_worker(campaign: Campaign, out: Path, formats: str) -> None:
    """The pool's initializer: runs once in each render process."""
    global _job
    bind_to_parent()
    _job = RenderJob(campaign, out, formats)


def serve_chunk(jobs: list[Job]) -> list[Served]:
    assert _job is not None, "init_worker runs first"
    return [_job(*job) for job in jobs]
