"""Headless Chromium for `preview --screenshots` (and the gallery's tests):
the Debian package `chromium` driven by Playwright with executable_path, so
nothing is downloaded at run time."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emailpers.errors import BrowserError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]
SCREEN_HEIGHT = 800
# Chromium gets a bare environment: a live preview has API secrets in ours.
_PASSED_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "XDG_RUNTIME_DIR", "FONTCONFIG_PATH")


def find_chromium() -> str | None:
    """$EMAILPERS_CHROMIUM, else the first Chromium on PATH."""
    chosen = os.environ.get("EMAILPERS_CHROMIUM")
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright Browser on the system's Chromium; BrowserError says what to install."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserError("screenshots need Playwright: pip install 'emailpers[preview]'") from None
    executable = find_chromium()
    if executable is None:
        raise BrowserError("no Chromium found (looked for $EMAILPERS_CHROMIUM, then " + ", ".join(CANDIDATES)
                           + " on PATH); on Debian or Ubuntu: apt-get install chromium")
    env: dict[str, str | float | bool] = {k: v for k, v in os.environ.items() if k in _PASSED_ENV}
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=LAUNCH_ARGS, env=env)
        except PlaywrightError as exc:
            raise BrowserError(f"{executable} did not start: {str(exc).splitlines()[0]}") from None
        try:
            yield browser
        finally:
            browser.close()


def screenshots(files: list[Path], folder: Path, widths: tuple[int, ...]) -> list[Path]:
    """A full-page PNG of every HTML file at every width: folder/<parent>--<stem>--<width>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    taken: list[Path] = []
    with chromium() as browser:
        page = browser.new_page()
        for file in files:
            for width in widths:
                page.set_viewport_size({"width": width, "height": SCREEN_HEIGHT})
                page.goto(file.resolve().as_uri())
                target = folder / f"{file.parent.name}--{file.stem}--{width}.png"
                page.screenshot(path=str(target), full_page=True)
                taken.append(target)
    return taken
