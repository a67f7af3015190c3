"""What a page open in the browser fixture (``tests/conftest.py``) shows and fetched."""

from pathlib import Path


def open_page(browser, path):
    """Opens a local file; returns the console messages that the load left (the log is emptied)."""
    browser.get(Path(path).resolve().as_uri())
    return browser.get_log("browser")


def network_requests(browser) -> list[str]:
    """Every resource the open page fetched that is not a local file (images next to it are)."""
    entries = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [url for url in entries if not url.startswith("file:")]
