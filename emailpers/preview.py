"""`emailpers preview`: every sampled recipient in every data state, as one
self-contained static page (DIR/index.html: no CDN, no server; works from a
CI artifact or file://).

States, per recipient: "live" (the data as fetched: fixtures, cache or APIs),
"<source> failed" for each source (every {% live %} block over it shows its
fallback), "all sources failed" when there are several, and the whole-email
fallback_template when the campaign has one and no other state showed it.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from emailpers import amp
from emailpers.cache import ResponseCache
from emailpers.campaign import Campaign
from emailpers.errors import RenderFailed
from emailpers.fetch import Fetcher
from emailpers.lint import GMAIL_CLIP_BYTES, Finding, lint_amp, lint_message, lint_template
from emailpers.output import Envelope, build_eml, file_stem
from emailpers.pipeline import RunOptions, cache_directory, run_client
from emailpers.render import Email, Renderer
from emailpers.sample import sample_campaign, shown_path

INDEX = "index.html"
WIDTHS = (600, 375)  # desktop, mobile
LIVE, ALL_FAILED, FALLBACK_TEMPLATE = "live", "all sources failed", "fallback_template"


@dataclass(frozen=True)
class Card:
    """One recipient in one data state."""

    recipient: str
    to: str
    state: str
    file: str  # emails/<recipient>/<state>.html, relative to the gallery
    subject: str = ""
    preheader: str = ""
    sender: str = ""
    size: int = 0  # bytes of HTML
    text: str = ""
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    fallback_template: bool = False
    failures: dict[str, str] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None  # the state could not be rendered
    amp: str | None = None  # the AMP part as sent (None: no AMP part, or dropped)
    amp_outcome: dict[str, Any] | None = None  # {"amp": "sent" | "dropped" | "unvalidated", "amp_errors": [...]}


@dataclass(frozen=True)
class Gallery:
    index: Path
    cards: list[Card]
    template_findings: list[Finding]

    @property
    def emails(self) -> list[Path]:
        return [self.index.parent / c.file for c in self.cards if c.error is None]


async def _fetch(campaign: Campaign, rows: list[dict[str, Any]], options: RunOptions) -> list[dict[str, Any]]:
    cache = ResponseCache(cache_directory(campaign, options)) if options.offline else None
    try:
        async with run_client(options) as client:
            fetcher = Fetcher(campaign, client, cache, offline=options.offline, concurrency=options.concurrency)
            return list(await asyncio.gather(*(fetcher.fetch_all(row) for row in rows)))
    finally:
        if cache is not None:
            cache.close()


def _states(campaign: Campaign, fetched: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(state, data, failures) for every state of one recipient."""
    data = {name: r.data for name, r in fetched.items() if r.ok}
    failures = {name: (r.error or r.outcome) for name, r in fetched.items() if not r.ok}
    states = [(LIVE, data, failures)]
    for name in campaign.sources:
        forced = {**failures, name: f"preview: {name} made to fail"}
        states.append((f"{name} failed", {k: v for k, v in data.items() if k != name}, forced))
    if len(campaign.sources) > 1:
        states.append((ALL_FAILED, {}, {name: "preview: every source made to fail" for name in campaign.sources}))
    return states


_PREHEADER = re.compile(r'<div style="display:none;[^"]*mso-hide:all;">(.*?)</div>', re.DOTALL)


def _card(recipient: str, to: str, state: str, message: Email, eml: bytes, sender: str,
          failures: dict[str, str], amp_file: str | None) -> Card:
    preheader = _PREHEADER.search(message.html)
    return Card(
        recipient, to, state, f"emails/{file_stem(recipient)}/{_slug(state)}.html",
        subject=message.subject, preheader=html.unescape(preheader.group(1)) if preheader else "", sender=sender,
        size=len(message.html.encode("utf-8")), text=message.text, fallbacks=message.fallback_blocks,
        fallback_template=message.used_fallback_template, failures=failures,
        findings=lint_message(eml, recipient=recipient) + lint_amp(message.amp_outcome, recipient=recipient, file=amp_file),
        amp=message.amp, amp_outcome=message.amp_outcome,
    )


def _slug(state: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", state).strip("-")


def build_gallery(campaign: Campaign, rows: list[dict[str, Any]], out: Path, *, replay: Path | None = None,
                  offline: bool = False, cache_dir: Path | None = None) -> Gallery:
    """Fetch each row's data once, render every state, lint it, write the gallery into `out`."""
    campaign = sample_campaign(campaign)
    amp_file = shown_path(campaign.amp.template) if campaign.amp else None
    options = RunOptions(out=None, replay=replay, offline=offline, use_cache=offline, cache_dir=cache_dir,
                         concurrency=8)
    fetched = asyncio.run(_fetch(campaign, rows, options))
    renderer = Renderer(campaign)
    whole = Renderer(replace(campaign, template=campaign.fallback_template)) if campaign.fallback_template else None
    envelope = Envelope.parse(campaign.from_)
    id_field, email_field = campaign.recipients.id_field, campaign.recipients.email_field
    cards: list[Card] = []
    emails: dict[str, str] = {}
    for row, results in zip(rows, fetched, strict=True):
        recipient, to = str(row[id_field]), str(row[email_field])
        states = _states(campaign, results)
        link = amp.link_for(campaign, recipient, time.time())
        rendered: list[tuple[str, Email | RenderFailed, dict[str, str]]] = []
        for state, data, failures in states:
            try:
                rendered.append((state, renderer.render(row, data, failures, amp_link=link), failures))
            except RenderFailed as exc:
                rendered.append((state, exc, failures))
        used = any(isinstance(m, Email) and m.used_fallback_template for _, m, _ in rendered)
        if whole is not None and not used:
            failures = {name: "preview: the whole-email fallback" for name in campaign.sources}
            try:
                email_ = whole.render(row, {}, failures, amp_link=link)
                rendered.append((FALLBACK_TEMPLATE, replace(email_, used_fallback_template=True), failures))
            except RenderFailed as exc:
                rendered.append((FALLBACK_TEMPLATE, exc, failures))
        for state, message, failures in rendered:
            if isinstance(message, RenderFailed):
                cards.append(Card(recipient, to, state, "", failures=failures, error=str(message)))
                continue
            eml = build_eml(message, to, envelope)
            card = _card(recipient, to, state, message, eml, envelope.from_, failures, amp_file)
            target = out / card.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(message.html, encoding="utf-8")
            emails[card.file] = message.html
            cards.append(card)
    template_findings: list[Finding] = []
    for path in sorted(renderer.template_files):
        template_findings += lint_template(shown_path(path), path.read_text(encoding="utf-8"))
    index = out / INDEX
    index.write_text(page(campaign, cards, template_findings, emails), encoding="utf-8")
    return Gallery(index, cards, template_findings)


# -- the page ---------------------------------------------------------------------------

_STYLE = """
body{font:14px/1.4 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#eef0f3;color:#1d2129}
header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #d0d4da;padding:10px 16px}
header h1{font-size:18px;margin:0 0 6px}
header label{margin-right:14px}
main{padding:12px 16px}
.card{background:#fff;border:1px solid #d0d4da;border-radius:6px;margin:0 0 16px;padding:12px}
.card h2{font-size:15px;margin:0 0 6px}
.state{display:inline-block;padding:1px 8px;border-radius:10px;background:#e3f1e6;color:#1e6b30;font-size:12px}
.state.failed{background:#fdecea;color:#a1261b}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:6px 0}
dt{color:#5b6470}dd{margin:0}
.frames{display:flex;gap:16px;align-items:flex-start;overflow-x:auto}
.frames figure{margin:0}
.frames figcaption{font-size:12px;color:#5b6470}
iframe{border:1px solid #c5cad1;background:#fff;height:400px}
.clip{position:relative;height:8px;background:#e6e8eb;border-radius:4px;width:300px;margin-top:4px}
.clip span{position:absolute;left:0;top:0;bottom:0;background:#1a73e8;border-radius:4px}
.clip.over span{background:#c5221f}
.clip i{position:absolute;top:-3px;bottom:-3px;width:2px;background:#c5221f}
.finding.error{color:#a1261b}.finding.warning{color:#8a5a00}
pre{white-space:pre-wrap;background:#f6f7f9;padding:8px;max-height:240px;overflow:auto}
.hidden{display:none}
.amp pre{width:520px;max-height:400px;margin:0;padding:0;font-size:12px}
.amp pre span{display:block;padding:0 6px}.amp pre b{display:inline-block;width:3em;color:#8a919b;font-weight:normal}
.amp pre span.bad{background:#fdecea}.amp p{font-size:12px;color:#5b6470;width:520px;margin:4px 0}
"""

_SCRIPT = """
(function(){
  var EMAILS=JSON.parse(document.getElementById('emails').textContent);
  var frames=document.querySelectorAll('iframe[data-src]');
  frames.forEach(function(f){
    f.addEventListener('load',function(){
      try{var d=f.contentDocument;if(d&&d.body){f.style.height=(d.documentElement.scrollHeight+4)+'px';}}catch(e){}
      f.setAttribute('data-loaded','1');
    });
    f.srcdoc=EMAILS[f.getAttribute('data-src')];
  });
  var q=document.getElementById('recipient'),s=document.getElementById('state'),r=document.getElementById('finding'),
    a=document.getElementById('amp');
  function apply(){
    var shown=0;
    document.querySelectorAll('.card').forEach(function(c){
      var ok=(!q.value||c.dataset.recipient.toLowerCase().indexOf(q.value.toLowerCase())>=0)
        &&(!s.value||c.dataset.state===s.value)
        &&(!r.value||(r.value==='none'?c.dataset.findings==='':(' '+c.dataset.findings+' ').indexOf(' '+r.value+' ')>=0))
        &&(!a||!a.value||c.dataset.amp===a.value);
      c.classList.toggle('hidden',!ok);if(ok)shown++;
    });
    document.getElementById('count').textContent=shown;
  }
  [q,s,r,a].forEach(function(e){if(!e)return;e.addEventListener('input',apply);e.addEventListener('change',apply);});
  apply();
})();
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _findings_html(findings: list[Finding]) -> str:
    if not findings:
        return "<p>No lint findings.</p>"
    items = "".join(
        f'<li class="finding {_e(f.severity)}">{_e(f.severity)} [{_e(f.rule)}] {_e(f.message)}'
        + (f" ({_e(f.file)}:{f.line})" if f.file and f.line else "") + "</li>"
        for f in findings
    )
    return f"<ul>{items}</ul>"


def _card_html(card: Card) -> str:
    rules = " ".join(sorted({f.rule for f in card.findings}))
    failed = "failed" if card.state != LIVE else ""
    head = (f'<h2>{_e(card.recipient)} &lt;{_e(card.to)}&gt; <span class="state {failed}">{_e(card.state)}</span></h2>')
    attrs = (f'class="card" data-recipient="{_e(card.recipient)}" data-state="{_e(card.state)}" data-findings="{_e(rules)}" '
             f'data-amp="{_e((card.amp_outcome or {}).get("amp", ""))}"')
    if card.error is not None:
        return f'<section {attrs}>{head}<p class="finding error">Not rendered: {_e(card.error)}</p></section>'
    share = min(card.size / GMAIL_CLIP_BYTES, 1.0) * 100
    over = " over" if card.size > GMAIL_CLIP_BYTES else ""
    clip = (f'<div class="clip{over}" title="Gmail clips at 102 KB"><span style="width:{share:.1f}%"></span>'
            f'<i style="left:100%"></i></div>')
    if card.fallback_template:
        why = "; ".join(f"{k}: {v}" for k, v in card.failures.items()) or "the main template needed data it lacked"
        fell = f"<li>the whole email is the fallback_template ({_e(why)})</li>"
    else:
        fell = "".join(
            f"<li>{_e(b.get('template'))}:{_e(b.get('line'))} {{% live {_e(', '.join(b.get('sources', [])))} %}} "
            f"fell back: {_e(b.get('reason'))}</li>"
            for b in card.fallbacks
        )
    frames = "".join(
        f'<figure><figcaption>{w} px</figcaption><iframe sandbox="allow-same-origin" data-src="{_e(card.file)}" '
        f'data-width="{w}" style="width:{w}px" title="{_e(card.recipient)} {_e(card.state)} {w}px"></iframe></figure>'
        for w in WIDTHS
    )
    return (
        f"<section {attrs}>{head}<dl>"
        f"<dt>Subject</dt><dd class=\"subject\">{_e(card.subject)}</dd>"
        f"<dt>Preheader</dt><dd>{_e(card.preheader) or '<em>none</em>'}</dd>"
        f"<dt>From</dt><dd>{_e(card.sender)}</dd>"
        f"<dt>Size</dt><dd>{card.size / 1024:.1f} KB of HTML (Gmail clips at 102 KB){clip}</dd>"
        f"<dt>Fallbacks</dt><dd><ul class=\"fallbacks\">{fell or '<li>none</li>'}</ul></dd></dl>"
        f'<div class="frames">{frames}{_amp_html(card)}</div>'
        f"<details><summary>Text part</summary><pre>{_e(card.text)}</pre></details>"
        f"<details open><summary>Lint findings ({len(card.findings)})</summary>{_findings_html(card.findings)}</details>"
        "</section>"
    )


def _amp_html(card: Card) -> str:
    """The AMP part beside the HTML: its source, lines numbered as the
    validator numbers them. Not rendered: the AMP runtime is a script from
    cdn.ampproject.org, and the gallery loads nothing from outside."""
    if card.amp_outcome is None:
        return ""
    outcome = str(card.amp_outcome.get("amp"))
    errors = card.amp_outcome.get("amp_errors") or []
    bad = {e.get("line") for e in errors}
    listed = "".join(
        f"<li>{'line ' + _e(e['line']) + ', column ' + _e(e['col']) + ': ' if e.get('line') else ''}"
        f"{_e(e.get('code'))}: {_e(e.get('message'))}</li>" for e in errors
    )
    if card.amp is None:
        body = f"<p>Not sent: the email went out with its text and HTML parts only.</p><ul>{listed}</ul>"
    else:
        lines = "".join(
            f"<span{' class=bad' if n in bad else ''}><b>{n}</b>{_e(line)}</span>"
            for n, line in enumerate(card.amp.split("\n"), 1)
        )
        note = "" if outcome == "sent" else "<p>Not checked by the AMP validator.</p>"
        body = (f"{note}<pre>{lines}</pre><p>The source: the AMP runtime (cdn.ampproject.org) cannot run in this "
                "offline page; Gmail's AMP playground shows it live.</p>")
    return (f'<figure class="amp"><figcaption>AMP part: <span class="amp-outcome {_e(outcome)}">{_e(outcome)}'
            f"</span></figcaption>{body}</figure>")


def page(campaign: Campaign, cards: list[Card], template_findings: list[Finding], emails: dict[str, str]) -> str:
    """The gallery. Each email goes in once, as JSON, into both of its iframes'
    srcdoc: the page stays one file, and a srcdoc frame (same origin, no
    scripts) can be measured to its full height."""
    data = json.dumps(emails).replace("<", "\\u003c")
    states = list(dict.fromkeys(c.state for c in cards))
    rules = sorted({f.rule for c in cards for f in c.findings})
    options = "".join(f'<option value="{_e(s)}">{_e(s)}</option>' for s in states)
    rule_options = "".join(f'<option value="{_e(r)}">{_e(r)}</option>' for r in rules)
    recipients = len({c.recipient for c in cards})
    amp_filter = ""
    if any(c.amp_outcome for c in cards):
        amp_filter = ('<label>AMP <select id="amp"><option value="">any</option><option value="sent">AMP sent</option>'
                      '<option value="dropped">AMP dropped</option><option value="unvalidated">AMP unvalidated</option>'
                      "</select></label>")
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Preview: {_e(campaign.name)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>Preview: {_e(campaign.name)}: {recipients} recipients, {len(cards)} emails "
        f'(<span id="count">{len(cards)}</span> shown)</h1>'
        '<label>Recipient <input id="recipient" type="search" placeholder="id"></label>'
        f'<label>State <select id="state"><option value="">all</option>{options}</select></label>'
        '<label>Finding <select id="finding"><option value="">any</option><option value="none">none</option>'
        f"{rule_options}</select></label>{amp_filter}</header><main>"
        f"<details><summary>Template findings ({len(template_findings)})</summary>"
        f"{_findings_html(template_findings)}</details>"
        + "".join(_card_html(c) for c in cards)
        + f'</main><script type="application/json" id="emails">{data}</script>'
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )


def summary_json(gallery: Gallery) -> dict[str, Any]:
    return {
        "index": str(gallery.index),
        "emails": len(gallery.cards),
        "recipients": sorted({c.recipient for c in gallery.cards}),
        "states": sorted({c.state for c in gallery.cards}),
        "findings": sum(len(c.findings) for c in gallery.cards) + len(gallery.template_findings),
        "not_rendered": [f"{c.recipient} ({c.state})" for c in gallery.cards if c.error],
    }


def dump(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2)
