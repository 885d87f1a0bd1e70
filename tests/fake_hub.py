"""A tiny in-process fake of the Hugging Face Hub API, enough for HfApi.create_repo, delete_repo,
create_branch, list_repo_files, create_commit (preupload + NDJSON commit) and merge_pull_request.

    with FakeHub(fail_commit=[503]) as hub:
        HfApi(endpoint=hub.url, token="...").create_commit(...)
        hub.commits, hub.requests, hub.files

Every request is recorded (method, path, query, lower-cased headers, body). Preupload answers uploadMode
"regular" for every file, so commits carry base64 file contents inline and no LFS transfer is
needed. `fail_commit` lists HTTP statuses the commit endpoint answers, in order, before it
accepts a commit; `error_echo` is added to those error messages (to test that clients scrub what
a server echoes back). The first `hang_commit` commit requests are read and then left unanswered
for `hang_seconds` (or until the hub is closed), after which the connection is dropped, as a hung
Hub would do; they come before any `fail_commit` status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REPO_OP = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<op>preupload|commit|branch|tree)/(?P<rev>[^/]+)$"
)
_MERGE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/discussions/(?P<num>\d+)/merge$")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    repo: str
    revision: str
    create_pr: bool
    header: dict[str, Any]
    files: dict[str, bytes]
    deleted: list[str]


@dataclass
class FakeHub:
    fail_commit: list[int] = field(default_factory=list)
    error_echo: str = ""
    hang_commit: int = 0
    hang_seconds: float = 60.0
    owner: str = "tester"
    requests: list[Request] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """repo id -> files on main (the fake keeps one revision: every commit lands on it)."""
    branches: set[tuple[str, str]] = field(default_factory=set)
    merged: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def commit_attempts(self) -> list[Request]:
        return [r for r in self.requests if "/commit/" in r.path]

    # ------------------------------------------------------------------------------------------

    def handle(self, req: Request) -> tuple[int, Any] | None:
        """(status, JSON payload) of the answer, or None: leave the request unanswered."""
        with self._lock:
            self.requests.append(req)
            if req.method == "POST" and req.path == "/api/repos/create":
                return self._create(json.loads(req.body))
            if req.method == "DELETE" and req.path == "/api/repos/delete":
                return self._delete(json.loads(req.body))
            if req.method == "POST" and req.path == "/api/validate-yaml":
                return 200, {"errors": [], "warnings": []}
            if m := _MERGE.match(req.path):
                self.merged.append((m["repo"], int(m["num"])))
                return 200, {}
            m = _REPO_OP.match(req.path)
            if m is None or m["repo"] not in self.repos:
                return 404, {"error": f"Repository or endpoint not found: {req.path}"}
            repo, rev = m["repo"], unquote(m["rev"])
            if m["op"] == "branch":
                if (repo, rev) in self.branches:
                    return 409, {"error": "Branch already exists"}
                self.branches.add((repo, rev))
                return 200, {}
            if m["op"] == "tree":
                return 200, [
                    {"type": "file", "path": p, "size": len(b), "oid": _oid(b)}
                    for p, b in sorted(self.repos[repo].items())
                ]
            if m["op"] == "preupload":
                files = json.loads(req.body)["files"]
                return 200, {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in files
                    ]
                }
            return self._commit(req, repo, rev)

    def _create(self, payload: dict[str, Any]) -> tuple[int, Any]:
        repo = f"{payload.get('organization') or self.owner}/{payload['name']}"
        if repo in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}
        self.repos[repo] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        return 200, {"url": f"{self.url}/{repo}", "name": repo}

    def _delete(self, payload: dict[str, Any]) -> tuple[int, Any]:
        repo = f"{payload.get('organization') or self.owner}/{payload['name']}"
        if self.repos.pop(repo, None) is None:
            return 404, {"error": f"Repository not found: {repo}"}
        self.branches = {(r, b) for r, b in self.branches if r != repo}
        return 200, {}

    def _commit(self, req: Request, repo: str, rev: str) -> tuple[int, Any] | None:
        if self.hang_commit:
            self.hang_commit -= 1
            return None
        if self.fail_commit:
            status = self.fail_commit.pop(0)
            return status, {"error": f"Fake failure {status}. {self.error_echo}".strip()}
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = {
            item["value"]["path"]: base64.b64decode(item["value"]["content"])
            for item in lines
            if item["key"] == "file"
        }
        deleted = [item["value"]["path"] for item in lines if item["key"] == "deletedFile"]
        create_pr = req.query.get("create_pr") == ["1"]
        self.commits.append(Commit(repo, rev, create_pr, header, files, deleted))
        state = self.repos[repo]
        state.update(files)
        for path in deleted:
            state.pop(path, None)
        oid = hashlib.sha1(req.body).hexdigest()
        pr = f"{self.url}/{repo}/discussions/{len(self.commits)}" if create_pr else None
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr}


def _oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            req = Request(
                self.command,
                parts.path,
                parse_qs(parts.query),
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length),
            )
            answer = hub.handle(req)
            if answer is None:
                hub._closing.wait(hub.hang_seconds)
                self.close_connection = True
                return
            status, payload = answer
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet: requests are recorded
            pass

    return Handler
