"""The URL of a source: the direct path for plain `{{ field }}` URLs and the
Jinja path give the same URL, byte for byte, and the same error."""

from __future__ import annotations

import jinja2
import pytest

from emailpers.urls import UrlTemplate, url_environment

VALUES = ["12345", "../admin?x=1#y", "a/b", "Zoë", "50%", 7, "...", "a b&c=d"]


@pytest.mark.parametrize("value", VALUES)
def test_plain_urls_fill_in_exactly_as_jinja_does(value: object) -> None:
    source = "https://api.example/v1/users/{{ id }}/cart?city={{city}}&v=1"
    env = url_environment()
    fields = {"id": value, "city": value}

    direct = UrlTemplate(source, env)

    assert direct._template is None  # the direct path is the one under test
    assert direct.render(fields) == env.from_string(source).render(fields)


def test_a_missing_field_is_the_same_error_on_both_paths() -> None:
    env = url_environment()
    source = "https://api.example/v1/users/{{ account }}/cart"
    with pytest.raises(jinja2.UndefinedError, match="'account' is undefined"):
        UrlTemplate(source, env).render({"id": "1"})
    with pytest.raises(jinja2.UndefinedError, match="'account' is undefined"):
        env.from_string(source).render({"id": "1"})


@pytest.mark.parametrize("value", [".", ".."])
def test_dot_segments_are_refused_on_both_paths(value: str) -> None:
    env = url_environment()
    source = "https://api.example/v1/users/{{ id }}/cart"
    for template in (UrlTemplate(source, env), env.from_string(source)):
        with pytest.raises(jinja2.UndefinedError, match="path step"):
            template.render({"id": value})


def test_anything_beyond_plain_fields_goes_through_jinja() -> None:
    env = url_environment()
    template = UrlTemplate("https://api.example/v1/users?ids={{ ids|join(',') }}", env)
    assert template._template is not None
    assert template.render({"ids": ["a", "b"]}) == "https://api.example/v1/users?ids=a%2Cb"
