"""Every call of the API as a request and a parser, shared by the sync and async clients.
``ROUTES`` names the client method of every route (a test checks it against the served
OpenAPI document, so a route without a method fails the tests)."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, Generic, Optional, TypeVar, Union
from urllib.parse import quote

import httpx

from . import models as m

T = TypeVar("T")

#: (method, path template) → the client method that calls it.
ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/health"): "health",
    ("GET", "/api/v1/ready"): "ready",
    ("GET", "/metrics"): "metrics",
    ("POST", "/api/v1/create"): "create",
    ("DELETE", "/api/v1/sandboxes/{chat_id}"): "delete",
    ("PUT", "/api/v1/sandboxes/{chat_id}"): "apply",
    ("GET", "/api/v1/sandboxes/{chat_id}"): "get",
    ("GET", "/api/v1/sandboxes"): "list",
    ("POST", "/api/v1/sandboxes/{chat_id}/renew"): "renew",
    ("POST", "/api/v1/sandboxes/{chat_id}/pause"): "pause",
    ("POST", "/api/v1/sandboxes/{chat_id}/hibernate"): "hibernate",
    ("POST", "/api/v1/sandboxes/{chat_id}/resume"): "resume",
    ("GET", "/api/v1/sandboxes/{chat_id}/events"): "events",
    ("POST", "/api/v1/sandboxes/{chat_id}/exec"): "exec",
    ("PUT", "/api/v1/sandboxes/{chat_id}/files"): "write_file",
    ("GET", "/api/v1/sandboxes/{chat_id}/files"): "read_file",
    ("GET", "/api/v1/sandboxes/{chat_id}/dir"): "list_dir",
    ("GET", "/api/v1/sandboxes/{chat_id}/files/watch"): "watch_files",
    ("POST", "/api/v1/sandboxes/{chat_id}/processes"): "start_process",
    ("GET", "/api/v1/sandboxes/{chat_id}/processes"): "list_processes",
    ("GET", "/api/v1/sandboxes/{chat_id}/processes/{process_id}"): "get_process",
    ("DELETE", "/api/v1/sandboxes/{chat_id}/processes/{process_id}"): "kill_process",
    ("GET", "/api/v1/sandboxes/{chat_id}/processes/{process_id}/output"): "process_output",
    ("POST", "/api/v1/sandboxes/{chat_id}/processes/{process_id}/stdin"): "process_stdin",
    ("POST", "/api/v1/sandboxes/{chat_id}/processes/{process_id}/signal"): "signal_process",
    ("GET", "/api/v1/sandboxes/{chat_id}/pty"): "terminal",
    ("POST", "/api/v1/workspaces"): "create_workspace",
    ("GET", "/api/v1/workspaces"): "list_workspaces",
    ("GET", "/api/v1/workspaces/{workspace_id}"): "get_workspace",
    ("PATCH", "/api/v1/workspaces/{workspace_id}"): "set_quota",
    ("POST", "/api/v1/workspaces/{workspace_id}/chats"): "create_chat",
    ("GET", "/api/v1/workspaces/{workspace_id}/chats"): "list_chats",
    ("GET", "/api/v1/chats/{chat_id}"): "get_chat",
    ("DELETE", "/api/v1/chats/{chat_id}"): "delete_chat",
    ("GET", "/api/v1/chats/{chat_id}/history"): "get_history",
    ("PUT", "/api/v1/chats/{chat_id}/history"): "put_history",
    ("POST", "/api/v1/chats/{chat_id}/history:append"): "append_history",
    ("PUT", "/api/v1/chats/{chat_id}/files/{name}"): "put_attachment",
    ("GET", "/api/v1/chats/{chat_id}/files/{name}"): "get_attachment",
    ("DELETE", "/api/v1/chats/{chat_id}/files/{name}"): "delete_attachment",
    ("GET", "/api/v1/chats/{chat_id}/files"): "list_attachments",
    ("GET", "/api/v1/openapi.json"): "openapi",
}


@dataclass
class Op(Generic[T]):
    """One request, and how its answer becomes a value."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Optional[dict[str, Any]] = None
    json: Any = None
    content: Optional[bytes] = None
    headers: Optional[dict[str, str]] = None
    #: Seconds the server may hold the request (a `wait`): added to the client's timeout.
    holds: float = 0.0


def seg(value: object) -> str:
    """A path segment, escaped."""
    return quote(str(value), safe="")


def _json(r: httpx.Response) -> Any:
    return r.json()


def _none(_: httpx.Response) -> None:
    return None


def _params(**kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in kw.items():
        if v is None:
            continue
        out[k] = ("true" if v else "false") if isinstance(v, bool) else v
    return out


def command(cmd: Union[str, list[str]]) -> Union[str, list[str]]:
    """A string runs under `sh -c`; a list is an argv."""
    return cmd if isinstance(cmd, str) else list(cmd)


def stdin_fields(stdin: Union[None, str, bytes]) -> dict[str, str]:
    if stdin is None:
        return {}
    if isinstance(stdin, str):
        return {"stdin": stdin}
    return {"stdin_base64": base64.b64encode(stdin).decode()}


# --- the old contract and the declarative API ----------------------------------------------


def health() -> Op[dict[str, Any]]:
    return Op("GET", "/api/v1/health", _json)


def ready() -> Op[dict[str, Any]]:
    return Op("GET", "/api/v1/ready", _json)


def metrics() -> Op[str]:
    return Op("GET", "/metrics", lambda r: r.text)


def openapi() -> Op[dict[str, Any]]:
    return Op("GET", "/api/v1/openapi.json", _json)


def create(chat_id: str, agent_id: str, volume_host_path: str, profile: Optional[str]) -> Op[m.Session]:
    body: dict[str, Any] = {"chat_id": chat_id, "agent_id": agent_id, "volume_host_path": volume_host_path}
    if profile is not None:
        body["profile"] = profile
    return Op("POST", "/api/v1/create", lambda r: m.Session.from_json(r.json()), json=body, holds=300)


def delete(chat_id: str) -> Op[m.Deleted]:
    def parse(r: httpx.Response) -> m.Deleted:
        d = r.json()
        return m.Deleted(d["chat_id"], d["result"], d.get("session_id"), d.get("container_id"))

    return Op("DELETE", f"/api/v1/sandboxes/{seg(chat_id)}", parse, holds=300)


def apply(
    chat_id: str,
    agent_id: str,
    volume_host_path: str,
    ttl_seconds: Optional[int],
    profile: Optional[str],
    state: Optional[str],
    wait: Optional[float],
) -> Op[m.Applied]:
    body: dict[str, Any] = {"agent_id": agent_id, "volume_host_path": volume_host_path}
    for k, v in (("ttl_seconds", ttl_seconds), ("profile", profile), ("state", state)):
        if v is not None:
            body[k] = v
    return Op(
        "PUT",
        f"/api/v1/sandboxes/{seg(chat_id)}",
        lambda r: m.Applied.from_json(r.json()),
        params=_params(wait=wait),
        json=body,
        holds=wait or 0,
    )


def get(chat_id: str, wait: Optional[float]) -> Op[m.SandboxView]:
    return Op(
        "GET",
        f"/api/v1/sandboxes/{seg(chat_id)}",
        lambda r: m.SandboxView.from_json(r.json()),
        params=_params(wait=wait),
        holds=wait or 0,
    )


def list_page(phase: Optional[str], agent_id: Optional[str], limit: Optional[int], cursor: Optional[str]) -> Op[m.Page]:
    def parse(r: httpx.Response) -> m.Page:
        d = r.json()
        return m.Page([m.SandboxView.from_json(i) for i in d["items"]], d.get("next_cursor"))

    return Op("GET", "/api/v1/sandboxes", parse, params=_params(phase=phase, agent_id=agent_id, limit=limit, cursor=cursor))


def renew(chat_id: str, ttl_seconds: Optional[int]) -> Op[m.SandboxView]:
    body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
    return Op("POST", f"/api/v1/sandboxes/{seg(chat_id)}/renew", lambda r: m.SandboxView.from_json(r.json()), json=body, holds=300)


def shortcut(chat_id: str, verb: str, wait: Optional[float]) -> Op[m.SandboxView]:
    return Op(
        "POST",
        f"/api/v1/sandboxes/{seg(chat_id)}/{verb}",
        lambda r: m.SandboxView.from_json(r.json()),
        params=_params(wait=wait),
        holds=wait or 0,
    )


def events(chat_id: str) -> Op[list[m.Event]]:
    def parse(r: httpx.Response) -> list[m.Event]:
        d = r.json()
        items = d if isinstance(d, list) else d.get("events", d.get("items", []))
        return [m.Event.from_json(e) for e in items]

    return Op("GET", f"/api/v1/sandboxes/{seg(chat_id)}/events", parse)


# --- the data plane ----------------------------------------------------------------------------


def exec_(
    chat_id: str,
    cmd: Union[str, list[str]],
    env: Optional[dict[str, str]],
    cwd: Optional[str],
    stdin: Union[None, str, bytes],
    timeout: Optional[int],
    stream: bool,
) -> Op[m.CommandResult]:
    body: dict[str, Any] = {"command": command(cmd), **stdin_fields(stdin)}
    if env:
        body["env"] = env
    if cwd is not None:
        body["workdir"] = cwd
    if timeout is not None:
        body["timeout_seconds"] = timeout
    if stream:
        body["stream"] = True
    return Op(
        "POST",
        f"/api/v1/sandboxes/{seg(chat_id)}/exec",
        lambda r: m.CommandResult.from_json(r.json()),
        json=body,
        holds=float(timeout or 3600),
    )


def write_file(chat_id: str, path: str, data: bytes, mode: Optional[int]) -> Op[m.Written]:
    def parse(r: httpx.Response) -> m.Written:
        d = r.json()
        return m.Written(d["path"], int(d["bytes"]), d["mode"])

    return Op(
        "PUT",
        f"/api/v1/sandboxes/{seg(chat_id)}/files",
        parse,
        params=_params(path=path, mode=None if mode is None else format(mode, "o")),
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )


def read_file(chat_id: str, path: str) -> Op[bytes]:
    return Op("GET", f"/api/v1/sandboxes/{seg(chat_id)}/files", lambda r: r.content, params=_params(path=path))


def list_dir(chat_id: str, path: Optional[str]) -> Op[list[m.DirEntry]]:
    def parse(r: httpx.Response) -> list[m.DirEntry]:
        return [
            m.DirEntry(e["name"], e["kind"], int(e["size"]), e["mode"], e.get("modified"), e.get("target"))
            for e in r.json()["entries"]
        ]

    return Op("GET", f"/api/v1/sandboxes/{seg(chat_id)}/dir", parse, params=_params(path=path))


def start_process(
    chat_id: str,
    cmd: Union[str, list[str]],
    env: Optional[dict[str, str]],
    cwd: Optional[str],
    stdin: Union[None, str, bytes],
) -> Op[m.ProcessInfo]:
    body: dict[str, Any] = {"command": command(cmd), **stdin_fields(stdin)}
    if env:
        body["env"] = env
    if cwd is not None:
        body["workdir"] = cwd
    return Op("POST", f"/api/v1/sandboxes/{seg(chat_id)}/processes", lambda r: m.ProcessInfo.from_json(r.json()), json=body)


def list_processes(chat_id: str) -> Op[list[m.ProcessInfo]]:
    return Op(
        "GET",
        f"/api/v1/sandboxes/{seg(chat_id)}/processes",
        lambda r: [m.ProcessInfo.from_json(p) for p in r.json()["processes"]],
    )


def process_path(chat_id: str, process_id: str) -> str:
    return f"/api/v1/sandboxes/{seg(chat_id)}/processes/{seg(process_id)}"


def get_process(chat_id: str, process_id: str) -> Op[m.ProcessInfo]:
    return Op("GET", process_path(chat_id, process_id), lambda r: m.ProcessInfo.from_json(r.json()))


def kill_process(chat_id: str, process_id: str) -> Op[m.ProcessInfo]:
    return Op("DELETE", process_path(chat_id, process_id), lambda r: m.ProcessInfo.from_json(r.json()))


def process_stdin(chat_id: str, process_id: str, data: Union[str, bytes], eof: bool) -> Op[m.ProcessInfo]:
    body: dict[str, Any] = {"eof": eof}
    if isinstance(data, str):
        body["data"] = data
    else:
        body["data_base64"] = base64.b64encode(data).decode()
    return Op("POST", process_path(chat_id, process_id) + "/stdin", lambda r: m.ProcessInfo.from_json(r.json()), json=body)


def signal_process(chat_id: str, process_id: str, signal: Union[str, int]) -> Op[int]:
    return Op(
        "POST",
        process_path(chat_id, process_id) + "/signal",
        lambda r: int(r.json()["delivered"]),
        json={"signal": str(signal)},
    )


# --- chat storage ------------------------------------------------------------------------------


def create_workspace(user_id: str, quota_bytes: Optional[int]) -> Op[m.Workspace]:
    body: dict[str, Any] = {"user_id": user_id}
    if quota_bytes is not None:
        body["quota_bytes"] = quota_bytes
    return Op("POST", "/api/v1/workspaces", lambda r: m.Workspace.from_json(r.json()), json=body)


def list_workspaces(user_id: Optional[str]) -> Op[list[m.Workspace]]:
    return Op(
        "GET",
        "/api/v1/workspaces",
        lambda r: [m.Workspace.from_json(w) for w in r.json()["items"]],
        params=_params(user_id=user_id),
    )


def get_workspace(workspace_id: str) -> Op[m.Workspace]:
    return Op("GET", f"/api/v1/workspaces/{seg(workspace_id)}", lambda r: m.Workspace.from_json(r.json()))


def set_quota(workspace_id: str, quota_bytes: int) -> Op[m.Workspace]:
    return Op(
        "PATCH",
        f"/api/v1/workspaces/{seg(workspace_id)}",
        lambda r: m.Workspace.from_json(r.json()),
        json={"quota_bytes": quota_bytes},
    )


def _chat(d: dict[str, Any]) -> m.Chat:
    return m.Chat(d["chat_id"], d["workspace_id"], d["created_at"])


def create_chat(workspace_id: str, chat_id: Optional[str]) -> Op[m.Chat]:
    body = {} if chat_id is None else {"chat_id": chat_id}
    return Op("POST", f"/api/v1/workspaces/{seg(workspace_id)}/chats", lambda r: _chat(r.json()), json=body)


def list_chats(workspace_id: str) -> Op[list[m.Chat]]:
    return Op("GET", f"/api/v1/workspaces/{seg(workspace_id)}/chats", lambda r: [_chat(c) for c in r.json()["items"]])


def get_chat(chat_id: str) -> Op[m.Chat]:
    return Op("GET", f"/api/v1/chats/{seg(chat_id)}", lambda r: _chat(r.json()))


def delete_chat(chat_id: str) -> Op[None]:
    return Op("DELETE", f"/api/v1/chats/{seg(chat_id)}", _none)


def get_history(chat_id: str) -> Op[str]:
    return Op("GET", f"/api/v1/chats/{seg(chat_id)}/history", lambda r: r.text)


def put_history(chat_id: str, text: str, append: bool) -> Op[int]:
    path = f"/api/v1/chats/{seg(chat_id)}/history" + (":append" if append else "")
    return Op(
        "POST" if append else "PUT",
        path,
        lambda r: int(r.json()["size_bytes"]),
        content=text.encode(),
        headers={"Content-Type": "text/markdown"},
    )


def _attachment(d: dict[str, Any]) -> m.Attachment:
    return m.Attachment(d["file_id"], d["chat_id"], d["name"], d.get("content_type"), int(d["size_bytes"]), d["created_at"])


def attachment_path(chat_id: str, name: str) -> str:
    return f"/api/v1/chats/{seg(chat_id)}/files/{seg(name)}"


def put_attachment(chat_id: str, name: str, data: bytes, content_type: str) -> Op[m.Attachment]:
    return Op(
        "PUT",
        attachment_path(chat_id, name),
        lambda r: _attachment(r.json()),
        content=data,
        headers={"Content-Type": content_type},
    )


def get_attachment(chat_id: str, name: str) -> Op[bytes]:
    return Op("GET", attachment_path(chat_id, name), lambda r: r.content)


def delete_attachment(chat_id: str, name: str) -> Op[None]:
    return Op("DELETE", attachment_path(chat_id, name), _none)


def list_attachments(chat_id: str) -> Op[list[m.Attachment]]:
    return Op("GET", f"/api/v1/chats/{seg(chat_id)}/files", lambda r: [_attachment(a) for a in r.json()["items"]])


# --- streams (pure parsing; the clients read the lines) ----------------------------------------


def exec_chunk(line: dict[str, Any]) -> Union[m.Chunk, m.CommandResult, None]:
    """A streamed exec's NDJSON line: a chunk, or the end (as a result without output)."""
    if "stream" in line:
        raw = line.get("data")
        data = raw.encode() if raw is not None else base64.b64decode(line.get("data_base64", ""))
        return m.Chunk(line["stream"], data)
    if "exit_code" in line:
        return m.CommandResult(
            exit_code=int(line["exit_code"]),
            stdout=b"",
            stderr=b"",
            timed_out=bool(line.get("timed_out", False)),
            truncated=False,
            duration_ms=int(line.get("duration_ms", 0)),
        )
    if "error" in line:
        from .errors import ServerError

        raise ServerError(502, line["error"])
    return None


class SseParser:
    """Server-Sent Events from text lines: feed lines, get (event, id, data) per event."""

    def __init__(self) -> None:
        self.event = "message"
        self.id: Optional[str] = None
        self.data: list[str] = []

    def feed(self, line: str) -> Optional[tuple[str, Optional[str], Any]]:
        line = line.rstrip("\r")
        if line == "":
            if not self.data:
                self.event = "message"
                return None
            out = (self.event, self.id, json.loads("\n".join(self.data)))
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "id":
            self.id = value
        elif name == "data":
            self.data.append(value)
        return None


def file_event(event: str, data: dict[str, Any]) -> m.FileEvent:
    if event == "resync":
        return m.FileEvent("resync", str(data.get("detail", "")))
    if event == "ready":
        return m.FileEvent("ready", str(data.get("path", "")), is_dir=None)
    return m.FileEvent(
        type=data["type"],
        path=data["path"],
        is_dir=data.get("is_dir"),
        side=data.get("side"),
        cookie=data.get("cookie"),
        scanned=bool(data.get("scanned", False)),
    )
