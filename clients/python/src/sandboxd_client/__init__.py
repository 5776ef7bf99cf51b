"""Python client for sandboxd.

    from sandboxd_client import Client

    with Client("http://127.0.0.1:8123", token="…") as client:
        sandbox = client.sandbox(chat_id, agent_id="agent", volume_host_path="/srv/volumes/v")
        print(sandbox.commands.run("echo hello").text)
"""

from .aio import AsyncClient, AsyncProcess, AsyncSandbox, AsyncTerminal
from .client import Client, Commands, Files, Process, Sandbox, Terminal
from .errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    SandboxConflict,
    SandboxdError,
    ServerError,
    Timeout,
    Unauthorized,
    Unavailable,
    ValidationError,
)
from .models import (
    Applied,
    Attachment,
    Chat,
    Chunk,
    CommandResult,
    Deleted,
    DirEntry,
    Endpoint,
    Event,
    FileEvent,
    OutputItem,
    Page,
    ProcessInfo,
    SandboxView,
    Session,
    Workspace,
    Written,
)
from ._ops import ROUTES

__all__ = [
    "AsyncClient", "AsyncProcess", "AsyncSandbox", "AsyncTerminal", "Client", "Commands", "Files",
    "Process", "Sandbox", "Terminal", "BadRequest", "Conflict", "Forbidden", "NotFound",
    "PayloadTooLarge", "RateLimited", "SandboxConflict", "SandboxdError", "ServerError", "Timeout",
    "Unauthorized", "Unavailable", "ValidationError", "Applied", "Attachment", "Chat", "Chunk",
    "CommandResult", "Deleted", "DirEntry", "Endpoint", "Event", "FileEvent", "OutputItem", "Page",
    "ProcessInfo", "SandboxView", "Session", "Workspace", "Written", "ROUTES",
]
