"""A small HTTP client for tests that drive a real server: cookies, forms, free ports."""

from __future__ import annotations

import html
import re
import socket
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar


class Browser:
    """A cookie-keeping HTTP client that submits the page's forms with their hidden fields."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        self.page = ""
        self.url = ""

    def get(self, path: str) -> str:
        return self._open(urllib.request.Request(self.base + path))

    def post(self, path: str, **form: str) -> str:
        """Submit the current page's form for ``path`` with its hidden fields and ``form``."""
        here = urllib.parse.urlsplit(self.url).path
        fields = [
            body
            for attributes, body in re.findall(r"<form([^>]*)>(.*?)</form>", self.page, re.S)
            if form_action(attributes, here) == path
        ]
        assert fields, f"no form for {path} on the current page"
        hidden = re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', fields[0])
        data = {name: html.unescape(value) for name, value in hidden}
        encoded = urllib.parse.urlencode({**data, **form}).encode()
        return self._open(urllib.request.Request(self.base + path, data=encoded))

    def _open(self, request: urllib.request.Request) -> str:
        with self.opener.open(request, timeout=10) as response:
            self.url = response.url
            self.page = response.read().decode()
        return self.page


def form_action(attributes: str, default: str) -> str:
    """Where a form posts: its ``action``, or the page it is on."""
    found = re.search(r'action="([^"]*)"', attributes)
    return html.unescape(found.group(1)) if found else default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
