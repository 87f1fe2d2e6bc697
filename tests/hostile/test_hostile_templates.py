"""Hostile templates and hostile data: what a campaign folder, a recipient list
or an API answer can try against the renderer. Each attack runs through the
real CLI against real files (and a loopback API where data comes from one);
one recipient that trips a limit fails, the others are rendered, the run ends.

Limits that need a clock are also tested on the Renderer with a fake clock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from emailpers.campaign import load_campaign
from emailpers.errors import RenderFailed
from emailpers.render import MAX_NESTING, Renderer

from conftest import ScriptedAPI, eml_of, manifest, parts, render, source, write_campaign

PEOPLE = [
    {"id": "ok", "email": "ok@example.com", "first_name": "Ann", "mode": "plain"},
    {"id": "evil", "email": "evil@example.com", "first_name": "Eve", "mode": "attack"},
]


def run_attack(tmp_path: Path, template: str = "<p>Hi</p>", *, workers: int = 0, **options: Any) -> dict[str, dict[str, Any]]:
    """Render PEOPLE with `template`, where `{% if mode == 'attack' %}` guards
    the attack: "ok" must come out rendered, the run must end with exit 3."""
    options.setdefault("recipients", PEOPLE)
    campaign = write_campaign(tmp_path / "c", template=template, **options)
    out = tmp_path / "out"
    result = render(campaign, out, workers=workers)
    assert result.exit_code == 3, result.output
    entries = manifest(out)
    assert entries["ok"]["status"] == "rendered", entries["ok"]
    assert entries["evil"]["status"] == "failed", entries["evil"]
    return entries


# -- resource limits (issue 8, items 9 and 15) ---------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_nested_loops_hit_the_render_deadline(tmp_path: Path, workers: int) -> None:
    template = (
        "<p>Hi {{ first_name }}</p>{% if mode == 'attack' %}"
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    )
    entries = run_attack(tmp_path, template, workers=workers, campaign={"render_deadline": 0.5})
    assert entries["evil"]["error"] == "the template ran longer than the render deadline of 0.5 s"


def test_nested_loops_over_data_hit_the_deadline_without_a_call_in_them(tmp_path: Path) -> None:
    # No range(), no attribute, no call inside: only the loop guard sees them.
    template = (
        "<p>Hi {{ first_name }}</p>{% if mode == 'attack' %}{% set s = first_name * 100000 %}"
        "{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}{% endif %}"
    )
    entries = run_attack(tmp_path, template, campaign={"render_deadline": 0.5})
    assert "render deadline" in entries["evil"]["error"]


class FakeClock:
    """Each reading is one second later: the deadline passes after a known
    number of looks, with no real waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += 1.0
        return self.now


def renderer_for(tmp_path: Path, template: str, **campaign: Any) -> Renderer:
    path = write_campaign(tmp_path / "c", template=template, campaign=campaign or None)
    return Renderer(load_campaign(path), clock=FakeClock())


def test_the_deadline_is_checked_from_the_sandbox_hooks(tmp_path: Path) -> None:
    # A deadline of 5 fake seconds: the sixth look at the clock is past it.
    renderer = renderer_for(
        tmp_path, "{% for i in range(10) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", render_deadline=5
    )
    with pytest.raises(RenderFailed, match="render deadline of 5 s"):
        renderer.render({"id": "r1", "email": "r1@example.com", "first_name": "Ann"}, {}, {})


def test_a_template_within_the_deadline_renders(tmp_path: Path) -> None:
    renderer = renderer_for(tmp_path, "{% for i in range(3) %}{{ i }}{% endfor %}", render_deadline=100)
    assert renderer.render({"id": "r1", "email": "r1@example.com", "first_name": "Ann"}, {}, {}).html == "012"


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("'x' * 10**9", "'*' would build 1000000000 items, more than 1000000"),
        ("[0] * 10**8", "'*' would build 100000000 items, more than 1000000"),
        ("10 ** 100000", "'**' would build an integer of more than 4096 bits"),
        ("range(10**7)|length", "range() of 10000000 items is more than the limit of 1000000"),
    ],
)
def test_sizes_a_template_can_build_are_capped(tmp_path: Path, expression: str, error: str) -> None:
    template = f"<p>Hi {{{{ first_name }}}}</p>{{% if mode == 'attack' %}}{{{{ {expression} }}}}{{% endif %}}"
    entries = run_attack(tmp_path, template)
    assert entries["evil"]["error"] == error


@pytest.mark.parametrize(
    ("where", "error"),
    [
        ("subject", "subject is 10000003 characters long, more than the 16384 allowed"),
        ("text", "the rendered email is 19 MiB, more than the 10 MiB limit"),
        ("html", "the rendered email is 19 MiB, more than the 10 MiB limit"),
    ],
)
def test_a_huge_subject_or_body_fails_the_recipient(tmp_path: Path, where: str, error: str) -> None:
    # Within the memory cap and the size caps (1,000,000 a piece), yet no header or email part should be
    # this large: 20 (10 for the subject) million characters.
    def huge(millions: int) -> str:
        return f"{{% if mode == 'attack' %}}{{% for i in range({millions}) %}}{{{{ 'x' * 1000000 }}}}{{% endfor %}}{{% endif %}}"

    options: dict[str, Any] = {"template": "<p>Hi {{ first_name }}</p>" + (huge(20) if where == "html" else "")}
    if where == "subject":
        options["campaign"] = {"subject": "Hi " + huge(10)}
    if where == "text":
        options["text_template"] = "Hi\n" + huge(20)
    entries = run_attack(tmp_path, **options)
    assert entries["evil"]["error"] == error


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="the memory cap is Linux only")
def test_memory_cap_fails_the_recipient_and_the_process_lives(tmp_path: Path) -> None:
    # indent() builds its string in C, out of reach of every hook: only the address-space cap
    # of a render process stops it (2 GB asked for, 512 MiB allowed). The main process
    # (--workers 0) has no such cap: RLIMIT_AS would cover its other threads too.
    template = "<p>Hi {{ first_name }}</p>{% if mode == 'attack' %}{{ 'x\nx'|indent(2 * 10**9) }}{% endif %}"
    entries = run_attack(tmp_path, template, workers=2, recipients=[*PEOPLE, {**PEOPLE[0], "id": "after"}])
    assert entries["evil"]["error"] == "the template needed more than the render memory cap (512 MiB)"
    assert entries["after"]["status"] == "rendered"


@pytest.mark.parametrize("workers", [0, 2])
def test_center_is_capped_like_multiplication(tmp_path: Path, workers: int) -> None:
    template = "<p>Hi {{ first_name }}</p>{% if mode == 'attack' %}{{ 'x'|center(2 * 10**9) }}{% endif %}"
    entries = run_attack(tmp_path, template, workers=workers, recipients=[*PEOPLE, {**PEOPLE[0], "id": "after"}])
    assert "center() to 2000000000 characters is more than the limit" in entries["evil"]["error"]
    assert entries["after"]["status"] == "rendered"


@pytest.mark.parametrize("workers", [0, 2])
def test_markup_nested_too_deep_for_mjml_fails_the_recipient(api: ScriptedAPI, tmp_path: Path, workers: int) -> None:
    # 10,000 levels made mjml-python kill its process (SIGSEGV with --workers 0).
    api.serve("/depth/ok", {"n": 3})
    api.serve("/depth/evil", {"n": 10000})
    template = (
        "<mjml><mj-body><mj-section><mj-column><mj-text>Hi {{ first_name }}</mj-text></mj-column></mj-section>"
        '{% live "depth" %}{{ ("<mj-wrapper>" * depth.n)|safe }}{{ ("</mj-wrapper>" * depth.n)|safe }}{% endlive %}'
        "</mj-body></mjml>"
    )
    entries = run_attack(tmp_path, template, workers=workers, template_name="email.mjml.j2",
                         sources={"depth": source(api.url + "/depth/{{ id }}")})
    # <mjml>, <mj-body>, then the 10,000 wrappers
    assert entries["evil"]["error"] == f"email.mjml.j2: markup nested 10002 deep, more than the {MAX_NESTING} MJML accepts"


# -- files: includes cannot leave the campaign folder (item 4) ------------------------


@pytest.mark.parametrize("include", ["{% include 'link.txt' %}", "{% include 'outside/secret.txt' %}"])
def test_include_through_a_symlink_out_of_the_folder_stops_before_the_run(tmp_path: Path, include: str) -> None:
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOP SECRET", encoding="utf-8")
    campaign = write_campaign(tmp_path / "c", template=f"<p>Hi</p>{include}")
    (tmp_path / "c" / "link.txt").symlink_to(secret)
    (tmp_path / "c" / "outside").symlink_to(secret.parent, target_is_directory=True)
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 1
    name = include.split("'")[1]
    assert result.stderr == (
        f"Error: {campaign.parent / 'email.html.j2'}: template includes {name}, which is not in {campaign.parent}\n"
    )
    assert not out.exists()


def test_a_symlink_to_a_file_inside_the_folder_still_works(tmp_path: Path) -> None:
    campaign = write_campaign(tmp_path / "c", template="<p>{% include 'alias.html' %}</p>",
                              files={"real.html": "Hi {{ first_name }}"})
    (tmp_path / "c" / "alias.html").symlink_to(tmp_path / "c" / "real.html")
    out = tmp_path / "out"
    assert render(campaign, out).exit_code == 0
    assert "<p>Hi Ann</p>" in parts(eml_of(out, manifest(out)["r1"]))["html"]


# -- escaping follows the output, not the file name (item 8) ---------------------------

SCRIPT = "<script>alert(1)</script>"


@pytest.mark.parametrize(
    ("template", "files"),
    [
        ("<p>{% include 'greeting.j2' %}</p>", {"greeting.j2": "Hi {{ shop.name }}"}),
        (
            "{% import 'macros.jinja' as m %}<p>{{ m.hello(shop.name) }}</p>",
            {"macros.jinja": "{% macro hello(name) %}Hi {{ name }}{% endmacro %}"},
        ),
    ],
)
def test_partials_and_macros_escape_api_data_whatever_their_names(
    api: ScriptedAPI, tmp_path: Path, template: str, files: dict[str, str]
) -> None:
    api.serve("/shop/r1", {"name": SCRIPT})
    campaign = write_campaign(tmp_path / "c", template=template, files=files, sources={"shop": source(api.url + "/shop/{{ id }}")})
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    html = parts(eml_of(out, manifest(out)["r1"]))["html"]
    assert "<script>" not in html
    assert "Hi &lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_text_template_and_the_subject_are_not_escaped(api: ScriptedAPI, tmp_path: Path) -> None:
    api.serve("/shop/r1", {"name": "Tom & Jerry <3"})
    campaign = write_campaign(
        tmp_path / "c", sources={"shop": source(api.url + "/shop/{{ id }}")},
        template="<p>{{ shop.name }}</p>", text_template="{% include 'sig.txt' %}\n",
        files={"sig.txt": "From {{ shop.name }}"}, campaign={"subject": "{{ shop.name }}"},
    )
    out = tmp_path / "out"

    assert render(campaign, out).exit_code == 0
    message = eml_of(out, manifest(out)["r1"])
    assert message["Subject"] == "Tom & Jerry <3"
    assert parts(message)["plain"].strip() == "From Tom & Jerry <3"
    assert "<p>Tom &amp; Jerry &lt;3</p>" in parts(message)["html"]


# -- control characters from the data (item 18) ----------------------------------------


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x00"], ids=["VT", "FF", "NUL"])
def test_control_characters_in_data_neither_break_mjml_nor_reach_a_header(
    api: ScriptedAPI, tmp_path: Path, char: str
) -> None:
    api.serve("/shop/r1", {"name": f"Mug{char}Tea"})
    template = (
        "<mjml><mj-body><mj-section><mj-column>"
        '{% live "shop" %}<mj-text>Cart: {{ shop.name }}</mj-text>{% fallback %}<mj-text>New in</mj-text>{% endlive %}'
        "</mj-column></mj-section></mj-body></mjml>"
    )
    campaign = write_campaign(
        tmp_path / "c", template=template, template_name="email.mjml.j2",
        recipients=[{"id": "r1", "email": "r1@example.com", "first_name": f"A{char}nn"}],
        sources={"shop": source(api.url + "/shop/{{ id }}")},
        campaign={"subject": "Hi {{ first_name }}", "headers": {"X-Name": "{{ first_name }}"}},
    )
    out = tmp_path / "out"

    result = render(campaign, out)

    assert result.exit_code == 0, result.output
    entry = manifest(out)["r1"]
    assert entry["status"] == "rendered", entry
    raw = (out / entry["files"][0]).read_bytes()
    head = raw[: raw.index(b"\r\n\r\n")]
    assert not any(b < 32 and b not in (9, 10, 13) or b == 127 for b in head), head
    message = eml_of(out, entry)
    assert "Cart: MugTea" in parts(message)["html"]
    # Encoded (RFC 2047), never raw; what a reader decodes is the name.
    assert "".join(c for c in message["Subject"] if c.isprintable() and not c.isspace()) == "HiAnn"
    assert not message.defects and not message["Subject"].defects


# -- header values (CR/LF injection held; long values fold) -----------------------------


@pytest.mark.parametrize("key", ["subject", "headers"])
def test_cr_lf_from_data_never_injects_a_header(tmp_path: Path, key: str) -> None:
    people = [PEOPLE[0], {**PEOPLE[1], "first_name": "Eve\r\nBcc: all@example.com"}]
    value: Any = "Hi {{ first_name }}" if key == "subject" else {"X-Greeting": "Hi {{ first_name }}"}
    entries = run_attack(tmp_path, "<p>Hi</p>", recipients=people, campaign={key: value})
    assert "header injection refused" in entries["evil"]["error"]
    assert list((tmp_path / "out" / "messages").iterdir()) == [tmp_path / "out" / "messages" / "ok.eml"]


def test_a_header_longer_than_998_characters_is_folded(tmp_path: Path) -> None:
    long_word = "x" * 2000
    campaign = write_campaign(tmp_path / "c", recipients=[{"id": "r1", "email": "r1@example.com", "first_name": long_word}],
                              campaign={"headers": {"X-Long": "{{ first_name }}"}})
    out = tmp_path / "out"

    assert render(campaign, out).exit_code == 0
    entry = manifest(out)["r1"]
    raw = (out / entry["files"][0]).read_bytes()
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    message = eml_of(out, entry)
    assert message["Subject"] == f"Hello {long_word}"
    assert message["X-Long"] == long_word


# -- the sandbox holds (regressions worth keeping) ----------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        "''.__class__.__mro__[1].__subclasses__()",
        "cycler.__init__.__globals__.os",
        "'{0.__class__.__mro__}'.format(first_name)",
        "'{0.__globals__}'.format(namespace.__init__)",
        "recipient.__class__.__init__.__globals__",
    ],
)
def test_sandbox_escapes_fail_the_recipient(tmp_path: Path, attack: str) -> None:
    template = f"<p>Hi {{{{ first_name }}}}</p>{{% if mode == 'attack' %}}{{{{ {attack} }}}}{{% endif %}}"
    entries = run_attack(tmp_path, template)
    assert "unsafe" in entries["evil"]["error"] or "undefined" in entries["evil"]["error"], entries["evil"]["error"]
    assert list((tmp_path / "out" / "messages").iterdir()) == [tmp_path / "out" / "messages" / "ok.eml"]


# -- the live-block state is out of the template's reach (item 22) ----------------------


def test_a_template_cannot_forge_the_manifest(api: ScriptedAPI, tmp_path: Path) -> None:
    # The state used to sit in the context as _emailpers_live_state.
    api.serve("/shop/r1", {"products": ["Mug"]})
    template = (
        "{% set s = _emailpers_live_state %}"
        "{% if s is defined %}{% set _ = s.fallback_blocks.append({'template': 'forged'}) %}"
        "{{ s.failures }}{% endif %}"
        '{% live "shop" %}<p>{{ shop.products|join(", ") }}</p>{% endlive %}'
    )
    campaign = write_campaign(tmp_path / "c", template=template, sources={"shop": source(api.url + "/shop/{{ id }}")})
    renderer = Renderer(load_campaign(campaign))

    email = renderer.render({"id": "r1", "email": "r1@example.com", "first_name": "Ann"}, {"shop": {"products": ["Mug"]}}, {})

    assert email.fallback_blocks == []
    assert email.html == "<p>Mug</p>"


def test_the_render_budget_ends_with_the_render(tmp_path: Path) -> None:
    from emailpers.sandbox import current

    renderer = renderer_for(tmp_path, "{{ nobody_has_this }}")
    with pytest.raises(RenderFailed):
        renderer.render({"id": "r1", "first_name": "Ann"}, {}, {})
    assert current.get() is None
