"""What sandboxd answers, as typed dataclasses. Every model keeps the whole answer in
``raw``: fields sandboxd adds later are there before this client names them."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Optional


def _bytes(text: str, encoding: Optional[str]) -> bytes:
    return base64.b64decode(text) if encoding == "base64" else text.encode()


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    @classmethod
    def from_json(cls, d: Optional[dict[str, Any]]) -> Optional["Endpoint"]:
        return cls(ip=d["ip"], port=int(d["port"])) if d else None


@dataclass(frozen=True)
class Session:
    """The old contract's answer to ``create``."""

    session_id: str
    chat_id: str
    agent_id: str
    volume_host_path: str
    container_id: Optional[str]
    endpoint: Optional[Endpoint]
    status: str
    expires_at: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Session":
        return cls(
            session_id=d["session_id"],
            chat_id=d["chat_id"],
            agent_id=d["agent_id"],
            volume_host_path=d["volume_host_path"],
            container_id=d.get("container_id"),
            endpoint=Endpoint.from_json(d.get("endpoint")),
            status=d["status"],
            expires_at=d["expires_at"],
            raw=d,
        )


@dataclass(frozen=True)
class SandboxView:
    """A sandbox's desired and observed state (the declarative API)."""

    chat_id: str
    session_id: str
    agent_id: str
    volume_host_path: str
    state: str
    phase: str
    container_id: Optional[str]
    endpoint: Optional[Endpoint]
    # The network the endpoint's address is on: the profile's, or a further one of its
    # settings (``sandbox-1``, …) once that was full.
    network: Optional[str]
    expires_at: str
    attempts: int
    last_error: Optional[str]
    converged: bool
    profile: Optional[str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SandboxView":
        return cls(
            chat_id=d["chat_id"],
            session_id=d["session_id"],
            agent_id=d["agent_id"],
            volume_host_path=d["volume_host_path"],
            state=d["state"],
            phase=d["phase"],
            container_id=d.get("container_id"),
            endpoint=Endpoint.from_json(d.get("endpoint")),
            network=d.get("network"),
            expires_at=d["expires_at"],
            attempts=int(d.get("attempts", 0)),
            last_error=d.get("last_error"),
            converged=bool(d.get("converged", False)),
            profile=d.get("profile"),
            raw=d,
        )


@dataclass(frozen=True)
class Applied:
    """What a ``PUT`` did (``created``, ``unchanged``, ``replaced``, ``state_changed``, …)."""

    outcome: str
    sandbox: SandboxView

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Applied":
        return cls(outcome=d["outcome"], sandbox=SandboxView.from_json(d["sandbox"]))


@dataclass(frozen=True)
class Page:
    items: list[SandboxView]
    next_cursor: Optional[str]


@dataclass(frozen=True)
class Deleted:
    chat_id: str
    result: str
    session_id: Optional[str] = None
    container_id: Optional[str] = None


@dataclass(frozen=True)
class Event:
    """A line of a chat's event log, or of the change stream."""

    id: int
    at: str
    chat_id: str
    action: str
    outcome: str
    phase: Optional[str]
    session_id: Optional[str]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Event":
        return cls(
            id=int(d["id"]),
            at=d["at"],
            chat_id=d["chat_id"],
            action=d["action"],
            outcome=d["outcome"],
            phase=d.get("phase"),
            session_id=d.get("session_id"),
            raw=d,
        )


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    duration_ms: int

    @property
    def text(self) -> str:
        """stdout as text (undecodable bytes replaced)."""
        return self.stdout.decode(errors="replace")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CommandResult":
        return cls(
            exit_code=int(d["exit_code"]),
            stdout=_bytes(d["stdout"], d.get("stdout_encoding")),
            stderr=_bytes(d["stderr"], d.get("stderr_encoding")),
            timed_out=bool(d["timed_out"]),
            truncated=bool(d["truncated"]),
            duration_ms=int(d["duration_ms"]),
        )


@dataclass(frozen=True)
class Chunk:
    """Output of a streamed command: ``stream`` is ``stdout`` or ``stderr``."""

    stream: str
    data: bytes


@dataclass(frozen=True)
class Written:
    path: str
    bytes: int
    mode: str


@dataclass(frozen=True)
class DirEntry:
    name: str
    kind: str
    size: int
    mode: str
    modified: Optional[str]
    target: Optional[str]


@dataclass(frozen=True)
class ProcessInfo:
    process_id: str
    pid: Optional[int]
    command: Any
    workdir: str
    state: str
    exit_code: Optional[int]
    started_at: str
    ended_at: Optional[str]
    output_bytes: int
    dropped_bytes: int
    output_kept: bool
    stdin_open: bool

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ProcessInfo":
        return cls(
            process_id=d["process_id"],
            pid=d.get("pid"),
            command=d.get("command"),
            workdir=d["workdir"],
            state=d["state"],
            exit_code=d.get("exit_code"),
            started_at=d["started_at"],
            ended_at=d.get("ended_at"),
            output_bytes=int(d["output_bytes"]),
            dropped_bytes=int(d["dropped_bytes"]),
            output_kept=bool(d["output_kept"]),
            stdin_open=bool(d["stdin_open"]),
        )


@dataclass(frozen=True)
class OutputItem:
    """An item of a process's output: ``output`` (``stream``, ``data``), ``dropped``
    (``dropped_bytes`` were lost before the reader came), or ``end`` (``process``).
    ``offset`` is where it starts; ``next`` is where a reader that saw it goes on."""

    type: str
    offset: int
    next: int
    stream: Optional[str] = None
    data: bytes = b""
    dropped_bytes: int = 0
    process: Optional[ProcessInfo] = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "OutputItem":
        kind, offset = d["type"], int(d["offset"])
        if kind == "output":
            data = _bytes(d["data"], d.get("encoding"))
            return cls(kind, offset, offset + len(data), stream=d["stream"], data=data)
        if kind == "dropped":
            n = int(d["dropped_bytes"])
            return cls(kind, offset, offset + n, dropped_bytes=n)
        return cls(kind, offset, offset, process=ProcessInfo.from_json(d["process"]))


@dataclass(frozen=True)
class FileEvent:
    """A file watch's event: ``ready`` first (the watch is armed; ``path`` is the watched
    one), then ``create``, ``modify``, ``delete`` or ``rename`` (with ``side`` and
    ``cookie``), or ``resync`` last (events were lost: list again and watch anew)."""

    type: str
    path: str
    is_dir: Optional[bool] = None
    side: Optional[str] = None
    cookie: Optional[int] = None
    scanned: bool = False


@dataclass(frozen=True)
class Workspace:
    workspace_id: str
    user_id: str
    quota_bytes: int
    created_at: str
    used_bytes: Optional[int]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Workspace":
        usage = d.get("usage") or {}
        return cls(
            workspace_id=d["workspace_id"],
            user_id=d["user_id"],
            quota_bytes=int(d["quota_bytes"]),
            created_at=d["created_at"],
            used_bytes=usage.get("used_bytes"),
        )


@dataclass(frozen=True)
class Chat:
    chat_id: str
    workspace_id: str
    created_at: str


@dataclass(frozen=True)
class Attachment:
    file_id: str
    chat_id: str
    name: str
    content_type: Optional[str]
    size_bytes: int
    created_at: str
