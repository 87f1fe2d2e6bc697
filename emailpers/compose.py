"""Compose one recipient's email and write its files: Jinja, MJML, the .eml.

What a render process runs, kept apart from pipeline.py so a spawned render
process imports only what it needs (no aiohttp, no diskcache: that import was
0.27 s of 0.33 s per process). It says what it made of a recipient, or why it
could not; the recipient's status is decided in outcome.py.
"""

from __future__ import annotations

from pathlib import Path

from emailpers.campaign import Campaign
from emailpers.errors import OutputError, RenderFailed
from emailpers.outcome import NotRendered, Rendered, RenderRequest, RenderResult
from emailpers.output import Envelope, write_message
from emailpers.processes import bind_to_parent
from emailpers.render import Renderer
from emailpers.sandbox import enable_memory_cap


class Composer:
    """Render one recipient and write its files. Built once per process."""

    def __init__(self, campaign: Campaign, out: Path, formats: str) -> None:
        self.renderer = Renderer(campaign)
        self.envelope = Envelope.parse(campaign.from_)
        self.out = out
        self.formats = formats

    def __call__(self, request: RenderRequest) -> RenderResult:
        try:
            message = self.renderer.render(
                request.fields, request.data, request.failures, request.unsubscribe_token, request.amp_link
            )
            files = write_message(self.out, request.id, request.email, message, self.formats, self.envelope)
        except RenderFailed as exc:
            return NotRendered(str(exc))
        except OutputError:
            raise  # the disk refused a message file: that stops the run, see write_message
        except Exception as exc:  # noqa: BLE001 - one recipient must never stop the run
            return NotRendered(f"unexpected error while rendering: {type(exc).__name__}: {exc}")
        return Rendered(files, message.fallback_blocks, message.used_fallback_template, message.amp_outcome)


_composer: Composer | None = None


def init_process(campaign: Campaign, out: Path, formats: str) -> None:
    """The pool's initializer: runs once in each render process."""
    global _composer
    bind_to_parent()
    enable_memory_cap()
    _composer = Composer(campaign, out, formats)


def compose_chunk(requests: list[RenderRequest]) -> list[RenderResult]:
    assert _composer is not None, "init_process runs first"
    return [_composer(request) for request in requests]
