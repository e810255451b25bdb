"""A tiny Hugging Face Hub on 127.0.0.1 for offline tests: serves checkpoint folders the way the Hub does
(the revision API, ``resolve`` URLs with the headers ``huggingface_hub`` reads, and its error codes)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """``repos``: repo id → folder; ``gated``: ids answered 401 GatedRepo. ``requests`` logs every path."""

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos, self.gated, self.requests = repos, set(gated), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Type", "application/json")
                payload = json.dumps({"error": code}).encode()
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(payload)

            def _serve(self, body: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    rest = parts[2:]
                    repo = "/".join(rest[:2])
                    rev = rest[3] if len(rest) >= 4 and rest[2] in ("revision", "tree") else "main"
                    if len(rest) >= 3 and rest[2] == "tree":
                        return self._tree(repo, rev, body)
                    return self._api(repo, rev, body)
                repo = "/".join(parts[:2])
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound")
                return self._file(repo, parts[3], "/".join(parts[4:]), body)

            def _check(self, repo: str, rev: str) -> bool:
                if repo in hub.gated:
                    self._error(401, "GatedRepo")
                    return False
                if repo not in hub.repos:
                    self._error(404, "RepoNotFound")
                    return False
                if rev not in ("main", COMMIT):
                    self._error(404, "RevisionNotFound")
                    return False
                return True

            def _api(self, repo: str, rev: str, body: bool):
                if not self._check(repo, rev):
                    return
                files = sorted(p.name for p in hub.repos[repo].iterdir() if p.is_file())
                self._json(
                    {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}, body
                )

            def _json(self, obj, body: bool):
                payload = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _tree(self, repo: str, rev: str, body: bool):
                if not self._check(repo, rev):
                    return
                entries = []
                for f in sorted(p for p in hub.repos[repo].iterdir() if p.is_file()):
                    data = f.read_bytes()
                    entries.append(
                        {"type": "file", "path": f.name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    )
                self._json(entries, body)

            def _file(self, repo: str, rev: str, name: str, body: bool):
                if not self._check(repo, rev):
                    return
                f = hub.repos[repo] / name
                if not f.is_file():
                    return self._error(404, "EntryNotFound")
                data = f.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
