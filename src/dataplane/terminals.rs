//! Terminals: an interactive TTY in a running sandbox (an engine exec with a TTY), carried
//! by a WebSocket at the HTTP edge. A terminal outlives its socket: one that drops waits
//! `data_plane.terminal_grace_seconds` to be re-attached by id (the last
//! `terminal_replay_bytes` of output are replayed), then is closed. Closing kills its whole
//! process tree by the marker its processes inherit, as an exec's timeout does. One socket
//! is attached at a time; a re-attach takes the terminal over from the one before.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::exec::{exit_code_of, session_env};
use super::limits::{Slot, Slots};
use super::ring::{Read, Stream as OutStream, PID_WRAPPER};
use super::tap::Tap;
use super::{Caller, DataPlane, DataPlaneError, Result, Target};
use crate::backend::io::{ExecChunk, ExecSpec, EXEC_MARKER_VAR};
use crate::domain::ChatId;
use crate::store::{EventAction, EventOutcome};

const CALL: &str = "terminal";
const KILL_WITHIN: Duration = Duration::from_secs(10);
const KILL_NONE: u8 = 0;
const KILL_CLOSED: u8 = 1;
const KILL_GRACE: u8 = 2;
/// Output kept for a live reader that is momentarily slower than the terminal (the replay
/// for a re-attach is the last `terminal_replay_bytes` of it).
const LIVE_BUFFER_BYTES: usize = 256 * 1024;
/// Largest terminal size accepted (columns, rows).
pub const MAX_COLS: u16 = 1000;
pub const MAX_ROWS: u16 = 500;

/// A terminal's size, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub cols: u16,
    pub rows: u16,
}

impl Size {
    /// `None` when either is 0 or over the maximum.
    pub fn new(cols: u64, rows: u64) -> Option<Self> {
        let ok =
            (1..=u64::from(MAX_COLS)).contains(&cols) && (1..=u64::from(MAX_ROWS)).contains(&rows);
        ok.then_some(Self {
            cols: cols as u16,
            rows: rows as u16,
        })
    }
}

/// How a terminal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Its command exited.
    Exited(Option<i64>),
    /// Closed by its client, or its grace period ran out: its tree was killed.
    Killed { grace_expired: bool },
    /// Its exec's stream broke (the container went away).
    Lost,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Exited(_) => "exited",
            Closed::Killed {
                grace_expired: false,
            } => "closed",
            Closed::Killed {
                grace_expired: true,
            } => "grace_expired",
            Closed::Lost => "lost",
        }
    }

    pub fn exit_code(self) -> Option<i64> {
        match self {
            Closed::Exited(c) => c,
            _ => None,
        }
    }
}

/// What an attached socket follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermProgress {
    pub end: u64,
    /// Bumped by every attach: a socket whose attach number is no longer current was taken
    /// over.
    pub attach: u64,
    pub closed: Option<Closed>,
}

/// One terminal.
pub struct Terminal {
    pub id: String,
    pub chat_id: ChatId,
    target: Target,
    marker: String,
    exec_id: String,
    /// The pid and the output (the live buffer; the replay is its tail).
    tap: Tap,
    input: tokio::sync::Mutex<Pin<Box<dyn AsyncWrite + Send>>>,
    progress: watch::Sender<TermProgress>,
    replay_bytes: u64,
    bytes_in: AtomicU64,
    /// Why it is being killed (`KILL_*`), set before the kill so that the exit the kill
    /// causes is recorded as the kill.
    killing: AtomicU8,
    size: Mutex<Size>,
    _slot: Slot,
    /// The current attachment's number, and its call slot while a socket is attached (a
    /// data-plane call: the sandbox is not idle). One lock, so a detach can never drop the
    /// slot of the attachment that replaced it.
    attachment: Mutex<(u64, Option<Slot>)>,
}

/// An attachment: what a socket reads and when it must stop.
pub struct Attached {
    pub terminal: Arc<Terminal>,
    pub number: u64,
    /// The offset to read from: the replay's start.
    pub from: u64,
}

impl Terminal {
    pub fn progress(&self) -> watch::Receiver<TermProgress> {
        self.progress.subscribe()
    }

    pub fn read_from(&self, offset: u64) -> Read {
        self.tap.read_from(offset)
    }

    /// The pid in the sandbox of the terminal's command, once known.
    pub fn pid(&self) -> Option<u32> {
        self.tap.pid()
    }

    pub fn size(&self) -> Size {
        *self.size.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keystrokes, as they come (any bytes: a TTY is not text).
    pub async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        let mut input = self.input.lock().await;
        input.write_all(data).await?;
        input.flush().await?;
        self.bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub async fn resize(&self, size: Size) -> Result<()> {
        self.target
            .io
            .resize_exec(&self.exec_id, size.cols, size.rows)
            .await
            .map_err(|e| DataPlaneError::engine(e, None))?;
        *self.size.lock().unwrap_or_else(|p| p.into_inner()) = size;
        Ok(())
    }

    fn push(&self, data: Bytes) {
        if let Some(end) = self.tap.push(OutStream::Stdout, data) {
            self.progress.send_modify(|p| p.end = end);
        }
    }
}

/// The terminals open in this run, by id.
pub struct Terminals {
    open: Mutex<HashMap<String, Arc<Terminal>>>,
    limits: Slots,
}

impl Terminals {
    pub fn new(
        overall: usize,
        per_sandbox: usize,
        gauge: prometheus_client::metrics::gauge::Gauge<i64>,
    ) -> Self {
        Self {
            open: Mutex::default(),
            limits: Slots::new(overall, per_sandbox, gauge),
        }
    }

    fn get(&self, id: &str) -> Option<Arc<Terminal>> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn remove(&self, id: &str) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

impl DataPlane {
    /// Opens a terminal running `argv` (a shell by default) at `size`, attached.
    pub async fn open_terminal(
        &self,
        chat_id: ChatId,
        argv: Vec<String>,
        size: Size,
        caller: &Caller,
    ) -> Result<Attached> {
        let (target, call) = self.target(chat_id, CALL).await?;
        let slot = self.terminals.limits.try_take(chat_id).map_err(|b| {
            DataPlaneError::Busy(b.detail("max_terminals", "max_terminals_per_sandbox"))
        })?;
        let id = uuid::Uuid::new_v4();
        let marker = format!("{EXEC_MARKER_VAR}={}", id.simple());
        let mut cmd = vec!["sh".into(), "-c".into(), PID_WRAPPER.into(), "sh".into()];
        cmd.extend(argv.iter().cloned());
        // No COLUMNS/LINES: they would override the TTY's size after a resize.
        let env = session_env(&["TERM=xterm-256color".to_string()], &target.env, &marker);
        let spec = ExecSpec {
            cmd,
            env,
            workdir: target
                .mounts
                .resolve(target.mounts.workdir(), None)?
                .absolute,
            stdin: true,
            tty: true,
        };
        let mut exec = target
            .io
            .start_exec(&target.container_id, spec)
            .await
            .map_err(|e| DataPlaneError::engine(e, None))?;
        let Some(input) = exec.input.take() else {
            return Err(DataPlaneError::Engine(
                "the engine gave no terminal input".into(),
            ));
        };
        let settings = &self.ctx.settings.data_plane;
        let terminal = Arc::new(Terminal {
            id: id.to_string(),
            chat_id,
            target: target.clone(),
            marker,
            exec_id: exec.id.clone(),
            tap: Tap::new(LIVE_BUFFER_BYTES.max(settings.terminal_replay_bytes)),
            input: tokio::sync::Mutex::new(input),
            progress: watch::channel(TermProgress {
                end: 0,
                attach: 1,
                closed: None,
            })
            .0,
            replay_bytes: settings.terminal_replay_bytes as u64,
            bytes_in: AtomicU64::new(0),
            killing: AtomicU8::new(KILL_NONE),
            size: Mutex::new(size),
            _slot: slot,
            attachment: Mutex::new((1, Some(call))),
        });
        self.terminals
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(terminal.id.clone(), terminal.clone());
        tokio::spawn(
            self.clone()
                .pump_terminal(terminal.clone(), caller.clone(), exec.output),
        );
        // The size applies once the process exists (the engine refuses it before).
        target
            .io
            .wait_exec_started(&terminal.exec_id, KILL_WITHIN)
            .await;
        if let Err(e) = terminal.resize(size).await {
            tracing::warn!(error = %e, "cannot size a new terminal");
        }
        terminal
            .tap
            .wait_pid(KILL_WITHIN, || terminal.progress.borrow().closed.is_some())
            .await;
        let detail = json!({
            "terminal_id": terminal.id,
            "command": serde_json::to_string(&argv).unwrap_or_default(),
            "cols": size.cols,
            "rows": size.rows,
            "pid": terminal.pid(),
        });
        self.audit(
            &target,
            caller,
            EventAction::Terminal,
            EventOutcome::Ok,
            detail,
        )
        .await;
        Ok(Attached {
            terminal,
            number: 1,
            from: 0,
        })
    }

    /// Re-attaches a socket to an open terminal (taking it over from any other), with the
    /// last `terminal_replay_bytes` of output to replay.
    pub async fn attach_terminal(&self, chat_id: ChatId, id: &str) -> Result<Attached> {
        let terminal = self
            .terminals
            .get(id)
            .filter(|t| t.chat_id == chat_id && t.progress.borrow().closed.is_none())
            .ok_or(DataPlaneError::TerminalNotFound)?;
        // A re-attach is a call on the sandbox (it must run: a paused one is resumed).
        let (_, call) = self.target(chat_id, CALL).await?;
        let number = {
            let mut a = terminal
                .attachment
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            a.0 += 1;
            a.1 = Some(call);
            a.0
        };
        terminal
            .progress
            .send_modify(|p| p.attach = p.attach.max(number));
        let end = terminal.progress.borrow().end;
        Ok(Attached {
            from: end.saturating_sub(terminal.replay_bytes),
            terminal,
            number,
        })
    }

    /// A socket went away without closing the terminal: it waits for a re-attach for the
    /// grace period, then is closed.
    pub fn detach_terminal(&self, attached: &Attached) {
        let t = attached.terminal.clone();
        {
            let mut a = t.attachment.lock().unwrap_or_else(|p| p.into_inner());
            if a.0 != attached.number {
                return; // taken over: the new socket holds it
            }
            drop(a.1.take());
        }
        let grace = Duration::from_secs(self.ctx.settings.data_plane.terminal_grace_seconds);
        let (this, number) = (self.clone(), attached.number);
        tokio::spawn(async move {
            let mut progress = t.progress();
            let reattached_or_closed =
                progress.wait_for(|p| p.attach != number || p.closed.is_some());
            if tokio::time::timeout(grace, reattached_or_closed)
                .await
                .is_err()
            {
                this.kill_terminal(&t, true).await;
            }
        });
    }

    /// Closes a terminal: kills its whole process tree; the pump records the end.
    pub async fn close_terminal(&self, t: &Terminal) {
        self.kill_terminal(t, false).await;
    }

    /// Kills the terminal's tree. A sandbox paused meanwhile (its socket gone, it went idle)
    /// refuses an exec: it is resumed for the kill, as for any call.
    async fn kill_terminal(&self, t: &Terminal, grace_expired: bool) {
        if t.progress.borrow().closed.is_some() {
            return;
        }
        let why = if grace_expired {
            KILL_GRACE
        } else {
            KILL_CLOSED
        };
        if t.killing
            .compare_exchange(KILL_NONE, why, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return; // a kill is under way
        }
        let kill = || {
            t.target
                .io
                .kill_marked(&t.target.container_id, &t.marker, KILL_WITHIN)
        };
        let mut killed = matches!(kill().await, Ok(true));
        if !killed {
            if let Ok((_target, _call)) = self.target(t.chat_id, CALL).await {
                killed = matches!(kill().await, Ok(true));
            }
        }
        if !killed {
            // Not recorded as killed: a later close or the command's own end settles it.
            t.killing.store(KILL_NONE, Ordering::SeqCst);
            tracing::warn!(terminal_id = %t.id, "terminal kill failed: processes may remain");
        }
    }

    async fn pump_terminal(
        self,
        t: Arc<Terminal>,
        caller: Caller,
        mut output: Pin<Box<dyn Stream<Item = crate::backend::Result<ExecChunk>> + Send>>,
    ) {
        let mut broken = false;
        while let Some(item) = output.next().await {
            match item {
                Ok(ExecChunk::Stdout(b)) | Ok(ExecChunk::Stderr(b)) => {
                    let (_, rest) = t.tap.feed_pid_line(b);
                    t.push(rest);
                }
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        t.tap.finish();
        let ending = match t.killing.load(Ordering::SeqCst) {
            KILL_CLOSED => Closed::Killed {
                grace_expired: false,
            },
            KILL_GRACE => Closed::Killed {
                grace_expired: true,
            },
            _ if broken => Closed::Lost,
            _ => Closed::Exited(exit_code_of(t.target.io.as_ref(), &t.exec_id).await.ok()),
        };
        let closed = ending;
        // Gone from the map before the end is published: a re-attach after it is a 404.
        self.terminals.remove(&t.id);
        drop(
            t.attachment
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .take(),
        );
        let detail = json!({
            "terminal_id": t.id,
            "closed": closed.as_str(),
            "exit_code": closed.exit_code(),
            "bytes_in": t.bytes_in.load(Ordering::Relaxed),
            "bytes_out": t.progress.borrow().end,
        });
        let outcome = if closed == Closed::Lost {
            EventOutcome::Error
        } else {
            EventOutcome::Ok
        };
        // Audited before the end is published: whoever saw the end finds the line.
        self.audit(&t.target, &caller, EventAction::Terminal, outcome, detail)
            .await;
        t.progress.send_modify(|p| p.closed = Some(closed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(Size::new(80, 24), Some(Size { cols: 80, rows: 24 }));
        assert_eq!(Size::new(1000, 500).map(|s| s.cols), Some(1000));
        for (c, r) in [
            (0, 24),
            (80, 0),
            (1001, 24),
            (80, 501),
            (u64::MAX, u64::MAX),
            (65536, 1),
        ] {
            assert_eq!(Size::new(c, r), None, "{c}x{r}");
        }
    }

    #[test]
    fn endings_name_themselves() {
        assert_eq!(Closed::Exited(Some(0)).as_str(), "exited");
        assert_eq!(
            Closed::Killed {
                grace_expired: true
            }
            .as_str(),
            "grace_expired"
        );
        assert_eq!(
            Closed::Killed {
                grace_expired: false
            }
            .exit_code(),
            None
        );
    }
}
