#!/usr/bin/env python3
"""Download a source distribution (sdist) from the package index pip is configured with.

    python scripts/fetch_sdist.py vllm 0.26.0 --dest build/sdist [--sha256 HEX]

`pip download --no-binary :all: vllm==0.26.0` cannot be used for vLLM: pip builds the sdist's metadata
after downloading it, and that needs CUDA and torch. This asks the index's simple API (PEP 691 JSON,
else PEP 503 HTML) for the file list instead, downloads `NAME-VERSION.tar.gz` and checks its sha256
against the index's hash and, when given, against ``--sha256``. The index is pip's own (``PIP_INDEX_URL``
or ``pip config``, else pip's default), and TLS uses pip's CA bundle (``PIP_CERT``) when set, so no host
is named here. Standard library plus pip.
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import os
import re
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path


def index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        for key in ("global.index-url", "install.index-url", "download.index-url"):
            r = subprocess.run([sys.executable, "-m", "pip", "config", "get", key],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                url = r.stdout.strip()
                break
    if not url:
        from pip._internal.models.index import PyPI  # pip's built-in default index
        url = PyPI.simple_url
    return url.rstrip("/") + "/"


def ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT")
    if not cafile:
        r = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                           capture_output=True, text=True)
        cafile = r.stdout.strip() if r.returncode == 0 else None
    return ssl.create_default_context(cafile=cafile or None)


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def find_file(project: str, filename: str, ctx: ssl.SSLContext) -> tuple[str, str | None]:
    """(url, sha256 or None) of ``filename`` in the project's simple page."""
    page = urllib.parse.urljoin(index_url(), re.sub(r"[-_.]+", "-", project).lower() + "/")
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(req, context=ctx, timeout=120) as r:
        ctype = r.headers.get("Content-Type", "")
        body = r.read().decode()
    if "json" in ctype:
        for f in json.loads(body)["files"]:
            if f["filename"] == filename:
                return urllib.parse.urljoin(page, f["url"]), f.get("hashes", {}).get("sha256")
    else:
        p = _Links()
        p.feed(body)
        for href in p.links:
            url = urllib.parse.urljoin(page, href)
            parts = urllib.parse.urlsplit(url)
            if parts.path.rsplit("/", 1)[-1] == filename:
                m = re.search(r"sha256=([0-9a-f]{64})", parts.fragment)
                return urllib.parse.urlunsplit(parts._replace(fragment="")), m and m.group(1)
    raise SystemExit(f"fetch_sdist: {filename} is not listed on the index page {page}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(project: str, version: str, dest: Path, want_sha256: str | None = None) -> Path:
    filename = f"{project}-{version}.tar.gz"
    out = dest / filename
    if out.exists() and want_sha256 and sha256_of(out) == want_sha256:
        return out
    ctx = ssl_context()
    url, index_sha = find_file(project, filename, ctx)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with urllib.request.urlopen(url, context=ctx, timeout=600) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            f.write(chunk)
    got = sha256_of(tmp)
    for label, want in (("index", index_sha), ("pinned", want_sha256)):
        if want and got != want:
            tmp.unlink()
            raise SystemExit(f"fetch_sdist: {filename} sha256 {got} does not match the {label} hash {want}")
    tmp.replace(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project")
    ap.add_argument("version")
    ap.add_argument("--dest", type=Path, default=Path("build/sdist"))
    ap.add_argument("--sha256", default=None, help="expected sha256 of the file")
    a = ap.parse_args()
    path = fetch(a.project, a.version, a.dest, a.sha256)
    print(f"{path}  sha256:{sha256_of(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
