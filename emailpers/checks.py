"""What a campaign cannot be right without, checked before the first request.

A typo in a template, a live block or a source URL would otherwise fail, or
fall back, every recipient at run time. Each check raises CampaignError
naming the file, the line and the first problem, with a guess when a close
name exists.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import jinja2
from jinja2 import meta, nodes

from emailpers.campaign import Campaign
from emailpers.errors import CampaignError
from emailpers.render import Parsed, Renderer, toml_where

BUILTINS = frozenset({"recipient", "preheader", "amp_url"})  # what Renderer.render adds (amp_url: amp_template only)


def check_campaign(campaign: Campaign, columns: Iterable[str], renderer: Renderer | None) -> None:
    """Source URLs read only recipient columns; with a renderer (a render,
    not `cache warm`), its templates' live blocks and names are checked too."""
    columns = list(columns)
    check_source_urls(campaign, columns)
    if renderer is not None:
        check_live_sources(campaign, renderer.parsed)
        check_names(campaign, renderer, columns)


def live_blocks(ast: nodes.Template) -> Iterable[tuple[int, list[str]]]:
    """(line, source names) of every `{% live %}` block in a parsed template."""
    for block in ast.find_all(nodes.CallBlock):
        call = block.call
        if isinstance(call.node, nodes.ExtensionAttribute) and call.node.name == "_live":
            names = call.args[0]
            assert isinstance(names, nodes.List)
            yield block.lineno, [n.value for n in names.items if isinstance(n, nodes.Const)]


def check_live_sources(campaign: Campaign, parsed: Iterable[Parsed]) -> None:
    """Every `{% live %}` names a source of the campaign."""
    sources = sorted(campaign.sources)
    for template in parsed:
        for lineno, names in live_blocks(template.ast):
            for name in names:
                if name not in campaign.sources:
                    raise CampaignError(
                        f"{template.where(lineno)}: {{% live %}} names unknown source {name!r}"
                        f"{_did_you_mean(name, sources)}; the campaign's sources: {', '.join(sources) or 'none'}"
                    )


def check_names(campaign: Campaign, renderer: Renderer, columns: list[str]) -> None:
    """Every name a template reads is a recipient column, a source or a built-in."""
    if not columns:
        return  # an unreadable or empty list: reading it says what is wrong, with the line
    known = set(columns) | set(campaign.sources) | BUILTINS | set(renderer.html_env.globals)
    known |= {"unsubscribe_url"} if campaign.unsubscribe and campaign.unsubscribe.url else set()
    # Jinja counts a name set inside an {% if %} as undeclared (the branch
    # may not run), and a base template's names reach its children's
    # blocks: a name any template assigns is the campaign's own.
    known |= {n.name for p in renderer.parsed for n in p.ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    for template in renderer.parsed:
        for name in sorted(meta.find_undeclared_variables(template.ast) - known):
            lineno = next((n.lineno for n in template.ast.find_all(nodes.Name) if n.name == name and n.ctx == "load"), 1)
            raise CampaignError(
                f"{template.where(lineno)}: {{{{ {name} }}}} is not a recipient column, a source or a "
                f"built-in{_did_you_mean(name, known)}; the recipient columns: {', '.join(columns) or 'none'}"
            )


def check_source_urls(campaign: Campaign, columns: Iterable[str]) -> None:
    """A source URL may read only recipient columns (a batch URL: `ids`), else
    every request would fail. Raises CampaignError naming the first unknown name."""
    columns = list(columns)
    if not columns:
        return  # an unreadable or empty list: reading it says what is wrong, with the line
    parser = jinja2.Environment()
    for name, source in campaign.sources.items():
        urls = [("url", source.url, set(columns))]
        if source.batch is not None:
            urls.append(("batch", source.batch.url, {"ids"}))
        for key, url, known in urls:
            ast = parser.parse(url)
            for unknown in sorted(meta.find_undeclared_variables(ast) - known - set(parser.globals)):
                what = "url" if key == "url" else "batch url"
                allowed = f"the recipient columns: {', '.join(columns) or 'none'}" if key == "url" else "it sees only ids"
                raise CampaignError(
                    f"{toml_where(campaign.path, f'sources.{name}', key)}: [sources.{name}] {what}: {{{{ {unknown} }}}} "
                    f"is not a recipient column{_did_you_mean(unknown, known)}; {allowed}"
                )


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


