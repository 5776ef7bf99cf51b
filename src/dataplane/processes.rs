//! Background processes: a command that outlives the request that started it and the
//! client's disconnect. sandboxd holds the engine's attach and pumps the output into a
//! bounded ring per process (`ring.rs`); readers come and go with a byte offset. Like an
//! exec, every process of its tree carries a marker variable, so a signal or a kill reaches
//! the whole tree however it detached, also after a restart of sandboxd.
//!
//! The record (`processes` table) survives a restart of sandboxd; the output does not: a
//! process that still runs afterwards is listed as running with `output_kept: false` (the
//! engine has no way to re-attach to an exec), and can still be signalled and killed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures::{Stream, StreamExt};
use serde_json::json;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::exec::{exit_code_of, session_env};
use super::limits::{Slot, Slots};
use super::output::Utf8Chunker;
use super::ring::{Read, Stream as OutStream, PID_WRAPPER};
use super::tap::Tap;
use super::{Caller, DataPlane, DataPlaneError, Result, Target};
use crate::backend::io::{ExecChunk, ExecSpec, SandboxIo, EXEC_MARKER_VAR};
use crate::backend::ErrorKind;
use crate::domain::{ChatId, Phase};
use crate::store::{EventAction, EventOutcome, ProcessRecord, ProcessState};

/// How these calls name themselves in a resume's event.
const CALL: &str = "process";
/// How long a start waits for the pid line.
const PID_WITHIN: Duration = Duration::from_secs(10);
/// How long a signal or kill may take.
const SIGNAL_WITHIN: Duration = Duration::from_secs(10);
/// After a kill, how long to wait for the output stream to end (and the end to be recorded).
const END_AFTER_KILL: Duration = Duration::from_secs(5);
/// Longest command text recorded.
const COMMAND_BYTES: usize = 1024;

/// Signals a client may send, by name (also accepted: `SIG` + name, or the number 1-64).
pub const SIGNALS: &[&str] = &[
    "HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP", "TSTP", "ALRM", "WINCH",
];

/// A signal as the kill script takes it: a known name or a number, never anything else (it
/// is an argument of `kill` inside the sandbox).
pub fn parse_signal(raw: &str) -> Option<String> {
    let upper = raw.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if SIGNALS.contains(&name) {
        return Some(name.to_string());
    }
    match name.parse::<u8>() {
        Ok(n) if (1..=64).contains(&n) => Some(n.to_string()),
        _ => None,
    }
}

/// What a start asks for (checked at the edge).
#[derive(Debug, Clone)]
pub struct ProcessRequest {
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    /// Written first; stdin stays open for `POST …/stdin` until closed.
    pub stdin: Option<Vec<u8>>,
}

/// A process as the API shows it: its record, and what sandboxd holds of it in memory.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    pub record: ProcessRecord,
    /// Whether sandboxd holds its output (it does not for one started before a restart).
    pub output_kept: bool,
    /// Output so far (stdout and stderr, bytes); the offset a reader at the end is at.
    pub output_bytes: u64,
    /// Output dropped from the front of the ring.
    pub dropped_bytes: u64,
    pub stdin_open: bool,
}

/// How the process's output ended, once it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    pub state: ProcessState,
    pub exit_code: Option<i64>,
}

/// What a reader waits on: the output's end offset, and the ending when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub end: u64,
    pub ended: Option<Ending>,
}

/// A process sandboxd started in this run, with its output.
pub struct Handle {
    record: ProcessRecord,
    io: Arc<dyn SandboxIo>,
    /// The pid and the output.
    tap: Tap,
    progress: watch::Sender<Progress>,
    stdin: tokio::sync::Mutex<Option<Pin<Box<dyn AsyncWrite + Send>>>>,
    stdin_bytes: AtomicU64,
    /// Set by a kill, so the stream's end is recorded as `killed`.
    killing: AtomicBool,
    /// Held while it runs (the process limits).
    slot: Mutex<Option<Slot>>,
}

impl Handle {
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The output from `since` on.
    pub fn read_from(&self, since: u64) -> Read {
        self.tap.read_from(since)
    }

    fn info(&self) -> ProcessInfo {
        let (end, dropped) = self.tap.extent();
        let mut record = self.record.clone();
        record.pid = self.tap.pid();
        if let Some(e) = self.progress.borrow().ended {
            record.state = e.state;
            record.exit_code = e.exit_code;
        }
        record.output_bytes = end;
        ProcessInfo {
            output_kept: true,
            output_bytes: end,
            dropped_bytes: dropped,
            stdin_open: self.stdin.try_lock().map(|s| s.is_some()).unwrap_or(true),
            record,
        }
    }

    fn push(&self, stream: OutStream, data: Vec<u8>) {
        if let Some(end) = self.tap.push(stream, Bytes::from(data)) {
            self.progress.send_modify(|p| p.end = end);
        }
    }
}

/// The processes sandboxd started in this run, by id, and the limits on running ones.
pub struct Registry {
    handles: Mutex<HashMap<String, Arc<Handle>>>,
    running: Slots,
}

impl Registry {
    pub fn new(
        overall: usize,
        per_sandbox: usize,
        gauge: prometheus_client::metrics::gauge::Gauge<i64>,
    ) -> Self {
        Self {
            handles: Mutex::default(),
            running: Slots::new(overall, per_sandbox, gauge),
        }
    }

    pub fn get(&self, process_id: &str) -> Option<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(process_id)
            .cloned()
    }

    /// Forgets the ended handles of one session of a chat.
    fn forget_session(&self, chat_id: ChatId, session: crate::domain::SessionId) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, h| {
                !(h.record.chat_id == chat_id
                    && h.record.session_id == session
                    && h.progress.borrow().ended.is_some())
            });
    }

    /// Forgets ended handles of the chat that its store records no longer name.
    fn retain(&self, chat_id: ChatId, kept: &[String]) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, h| {
                h.record.chat_id != chat_id
                    || h.progress.borrow().ended.is_none()
                    || kept.contains(id)
            });
    }
}

impl DataPlane {
    /// Starts a background process and answers once it runs (its pid known).
    pub async fn start_process(
        &self,
        chat_id: ChatId,
        req: ProcessRequest,
        caller: &Caller,
    ) -> Result<ProcessInfo> {
        let (target, _call) = self.target(chat_id, CALL).await?;
        let slot = self.processes.running.try_take(chat_id).map_err(|b| {
            DataPlaneError::Busy(b.detail("max_processes", "max_processes_per_sandbox"))
        })?;
        let workdir = target.mounts.resolve(
            req.workdir.as_deref().unwrap_or(target.mounts.workdir()),
            None,
        )?;
        let id = uuid::Uuid::new_v4();
        let marker = format!("{EXEC_MARKER_VAR}={}", id.simple());
        let mut cmd = vec!["sh".into(), "-c".into(), PID_WRAPPER.into(), "sh".into()];
        cmd.extend(req.argv.iter().cloned());
        let spec = ExecSpec {
            cmd,
            env: session_env(&req.env, &target.env, &marker),
            workdir: workdir.absolute.clone(),
            stdin: true,
            tty: false,
        };
        let mut exec = target
            .io
            .start_exec(&target.container_id, spec)
            .await
            .map_err(|e| DataPlaneError::engine(e, None))?;
        let stdin = exec.input.take();
        let record = ProcessRecord {
            process_id: id.to_string(),
            chat_id,
            session_id: target.session_id,
            container_id: target.stored_container_id.clone(),
            exec_id: exec.id.clone(),
            marker,
            command: cut(
                serde_json::to_string(&req.argv).unwrap_or_default(),
                COMMAND_BYTES,
            ),
            workdir: workdir.absolute,
            pid: None,
            state: ProcessState::Running,
            exit_code: None,
            started_at: Utc::now(),
            ended_at: None,
            output_bytes: 0,
        };
        let handle = Arc::new(Handle {
            record: record.clone(),
            io: target.io.clone(),
            tap: Tap::new(self.ctx.settings.data_plane.process_output_bytes),
            progress: watch::channel(Progress {
                end: 0,
                ended: None,
            })
            .0,
            stdin: tokio::sync::Mutex::new(stdin),
            stdin_bytes: AtomicU64::new(0),
            killing: AtomicBool::new(false),
            slot: Mutex::new(Some(slot)),
        });
        if let Err(e) = self.ctx.store.process_insert(&record).await {
            // Not recorded: it must not run unseen.
            let _ = target
                .io
                .kill_marked(&target.container_id, &record.marker, SIGNAL_WITHIN)
                .await;
            return Err(e.into());
        }
        self.processes
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.process_id.clone(), handle.clone());
        tokio::spawn(self.clone().pump(
            handle.clone(),
            target.clone(),
            caller.clone(),
            exec.output,
        ));
        if let Some(data) = req.stdin {
            // The process runs and is recorded: a stdin it does not read is its business
            // (the answer says `stdin_open: false`), not a failed start.
            if let Err(e) = self.write_stdin(&handle, &data, false).await {
                tracing::info!(error = %e, "a process's first stdin was not read");
            }
        }
        // The pid line comes first (or the stream ends without one).
        handle
            .tap
            .wait_pid(PID_WITHIN, || handle.progress.borrow().ended.is_some())
            .await;
        let info = handle.info();
        let detail = json!({
            "process_id": record.process_id,
            "command": record.command,
            "workdir": record.workdir,
            "pid": info.record.pid,
        });
        self.audit(
            &target,
            caller,
            EventAction::ProcessStart,
            EventOutcome::Ok,
            detail,
        )
        .await;
        self.forget_old(chat_id, target.session_id).await;
        Ok(info)
    }

    /// The session's processes, oldest first.
    pub async fn processes(&self, chat_id: ChatId) -> Result<Vec<ProcessInfo>> {
        let row = self
            .ctx
            .store
            .get(chat_id)
            .await?
            .ok_or(DataPlaneError::NotFound)?;
        let records = self.ctx.store.processes(chat_id, row.session_id).await?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            out.push(self.info_of(r).await);
        }
        Ok(out)
    }

    /// One process of the chat.
    pub async fn process(&self, chat_id: ChatId, process_id: &str) -> Result<ProcessInfo> {
        let record = self.record(chat_id, process_id).await?;
        Ok(self.info_of(record).await)
    }

    /// The process's output from `since`, and its progress to follow it; `None` when
    /// sandboxd does not hold its output (started before a restart, or forgotten).
    pub async fn output(
        &self,
        chat_id: ChatId,
        process_id: &str,
    ) -> Result<(ProcessInfo, Option<Arc<Handle>>)> {
        let info = self.process(chat_id, process_id).await?;
        let handle = self
            .processes
            .get(process_id)
            .filter(|h| h.record.chat_id == chat_id);
        Ok((info, handle))
    }

    /// Writes to the process's stdin, and closes it when `eof`.
    pub async fn process_stdin(
        &self,
        chat_id: ChatId,
        process_id: &str,
        data: &[u8],
        eof: bool,
    ) -> Result<ProcessInfo> {
        let info = self.process(chat_id, process_id).await?;
        if info.record.state != ProcessState::Running {
            return Err(DataPlaneError::ProcessConflict(format!(
                "process_not_running: the process is {}",
                info.record.state.as_str()
            )));
        }
        let Some(handle) = self.processes.get(process_id) else {
            return Err(DataPlaneError::ProcessConflict(
                "stdin_not_attached: sandboxd restarted since the process started; its stdin is closed".into(),
            ));
        };
        self.ctx.store.touch(chat_id, Utc::now()).await?;
        self.write_stdin(&handle, data, eof).await?;
        Ok(handle.info())
    }

    /// Sends a signal to the process's whole tree; how many processes got it.
    pub async fn signal_process(
        &self,
        chat_id: ChatId,
        process_id: &str,
        signal: &str,
        caller: &Caller,
    ) -> Result<(ProcessInfo, u32)> {
        let record = self.record(chat_id, process_id).await?;
        let info = self.info_of(record).await;
        if info.record.state != ProcessState::Running {
            return Err(DataPlaneError::ProcessConflict(format!(
                "process_not_running: the process is {}",
                info.record.state.as_str()
            )));
        }
        let (target, _call) = self.target(chat_id, CALL).await?;
        let delivered = target
            .io
            .signal_marked(
                &target.container_id,
                &info.record.marker,
                signal,
                SIGNAL_WITHIN,
            )
            .await
            .map_err(|e| DataPlaneError::engine(e, None))?;
        let detail = json!({ "process_id": process_id, "signal": signal, "delivered": delivered });
        self.audit(
            &target,
            caller,
            EventAction::ProcessSignal,
            EventOutcome::Ok,
            detail,
        )
        .await;
        Ok((info, delivered))
    }

    /// Kills the process's whole tree (SIGKILL, from inside the sandbox, as an exec's
    /// timeout does); a process that already ended is answered as it is.
    pub async fn kill_process(
        &self,
        chat_id: ChatId,
        process_id: &str,
        caller: &Caller,
    ) -> Result<ProcessInfo> {
        let record = self.record(chat_id, process_id).await?;
        let info = self.info_of(record).await;
        if info.record.state != ProcessState::Running {
            return Ok(info);
        }
        let (target, _call) = self.target(chat_id, CALL).await?;
        let handle = self.processes.get(process_id);
        if let Some(h) = &handle {
            h.killing.store(true, Ordering::SeqCst);
        }
        let killed = match target
            .io
            .kill_marked(&target.container_id, &info.record.marker, SIGNAL_WITHIN)
            .await
        {
            Ok(k) => k,
            Err(e) => {
                // Nothing was killed: a later end of its own is not a kill.
                if let Some(h) = &handle {
                    h.killing.store(false, Ordering::SeqCst);
                }
                return Err(DataPlaneError::engine(e, None));
            }
        };
        match &handle {
            Some(h) => {
                // The pump records the end when the stream closes.
                let mut progress = h.progress();
                let _ =
                    tokio::time::timeout(END_AFTER_KILL, progress.wait_for(|p| p.ended.is_some()))
                        .await;
            }
            None => {
                self.ctx
                    .store
                    .process_end(process_id, ProcessState::Killed, None, 0, Utc::now())
                    .await?;
            }
        }
        let detail = json!({ "process_id": process_id, "signal": "KILL", "killed": killed });
        self.audit(
            &target,
            caller,
            EventAction::ProcessSignal,
            EventOutcome::Ok,
            detail,
        )
        .await;
        self.process(chat_id, process_id).await
    }

    /// Reads the output until the stream ends, then records how the process ended.
    async fn pump(
        self,
        h: Arc<Handle>,
        target: Target,
        caller: Caller,
        mut output: Pin<Box<dyn Stream<Item = crate::backend::Result<ExecChunk>> + Send>>,
    ) {
        let (mut out, mut err) = (Utf8Chunker::default(), Utf8Chunker::default());
        let mut broken = None;
        while let Some(item) = output.next().await {
            match item {
                Ok(ExecChunk::Stdout(b)) => {
                    let (pid, rest) = h.tap.feed_pid_line(b);
                    if let Some(pid) = pid {
                        if let Err(e) = self
                            .ctx
                            .store
                            .process_set_pid(&h.record.process_id, pid)
                            .await
                        {
                            tracing::warn!(error = %e, "cannot record a process's pid");
                        }
                    }
                    h.push(OutStream::Stdout, out.push(&rest));
                }
                Ok(ExecChunk::Stderr(b)) => h.push(OutStream::Stderr, err.push(&b)),
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        h.push(OutStream::Stdout, out.finish());
        h.push(OutStream::Stderr, err.finish());
        h.tap.finish();
        let (state, exit_code) = match broken {
            Some(e) => {
                tracing::warn!(error = %e, process_id = %h.record.process_id, "a process's output stream broke");
                (ProcessState::Lost, None)
            }
            None => match exit_code_of(h.io.as_ref(), &h.record.exec_id).await {
                Ok(code) => (ProcessState::Exited, Some(code)),
                Err(_) => (ProcessState::Lost, None),
            },
        };
        let state = if h.killing.load(Ordering::SeqCst) {
            ProcessState::Killed
        } else {
            state
        };
        let end = h.progress.borrow().end;
        if let Err(e) = self
            .ctx
            .store
            .process_end(&h.record.process_id, state, exit_code, end, Utc::now())
            .await
        {
            tracing::error!(error = %e, process_id = %h.record.process_id, "cannot record a process's end");
        }
        drop(h.slot.lock().unwrap_or_else(|p| p.into_inner()).take());
        let detail = json!({
            "process_id": h.record.process_id,
            "state": state.as_str(),
            "exit_code": exit_code,
            "output_bytes": end,
            "stdin_bytes": h.stdin_bytes.load(Ordering::Relaxed),
        });
        let outcome = if state == ProcessState::Lost {
            EventOutcome::Error
        } else {
            EventOutcome::Ok
        };
        // Audited before the end is published: whoever saw the end finds the line.
        self.audit(&target, &caller, EventAction::ProcessEnd, outcome, detail)
            .await;
        h.progress
            .send_modify(|p| p.ended = Some(Ending { state, exit_code }));
        *h.stdin.lock().await = None;
        self.forget_if_superseded(h.record.chat_id, h.record.session_id)
            .await;
    }

    /// A process that ended because its session did (the sandbox deleted, replaced or
    /// purged): the chat's records and output of that session go, so nothing is held for a
    /// chat that will never be read again.
    async fn forget_if_superseded(&self, chat_id: ChatId, session: crate::domain::SessionId) {
        let current = match self.ctx.store.get(chat_id).await {
            Ok(row) => row.filter(|r| r.deleted_at.is_none()).map(|r| r.session_id),
            Err(_) => return,
        };
        if current == Some(session) {
            return;
        }
        self.processes.forget_session(chat_id, session);
        if let Err(e) = self.ctx.store.processes_forget(chat_id, session).await {
            tracing::warn!(error = %e, "cannot forget a finished session's processes");
        }
    }

    async fn write_stdin(&self, h: &Handle, data: &[u8], eof: bool) -> Result<()> {
        let mut stdin = h.stdin.lock().await;
        let Some(pipe) = stdin.as_mut() else {
            return Err(DataPlaneError::ProcessConflict(
                "stdin_closed: the process's stdin was closed".into(),
            ));
        };
        let written = async {
            pipe.write_all(data).await?;
            pipe.flush().await?;
            if eof {
                pipe.shutdown().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let result = tokio::time::timeout(SIGNAL_WITHIN, written).await;
        h.stdin_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if eof || !matches!(result, Ok(Ok(()))) {
            *stdin = None;
        }
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DataPlaneError::ProcessConflict(format!(
                "stdin_closed: the process no longer reads its stdin ({e})"
            ))),
            Err(_) => Err(DataPlaneError::ProcessConflict(
                "stdin_full: the process does not read its stdin".into(),
            )),
        }
    }

    async fn record(&self, chat_id: ChatId, process_id: &str) -> Result<ProcessRecord> {
        let row = self
            .ctx
            .store
            .get(chat_id)
            .await?
            .ok_or(DataPlaneError::NotFound)?;
        self.ctx
            .store
            .process(chat_id, process_id)
            .await?
            .filter(|r| r.session_id == row.session_id)
            .ok_or(DataPlaneError::ProcessNotFound)
    }

    /// The record with what this run holds of it; a running record this run did not start
    /// (sandboxd restarted since) is checked against the engine.
    async fn info_of(&self, record: ProcessRecord) -> ProcessInfo {
        if let Some(h) = self.processes.get(&record.process_id) {
            return h.info();
        }
        let record = if record.state == ProcessState::Running {
            self.refresh_detached(record).await
        } else {
            record
        };
        ProcessInfo {
            output_kept: false,
            output_bytes: record.output_bytes,
            dropped_bytes: 0,
            stdin_open: false,
            record,
        }
    }

    /// Whether a process from before a restart still runs: the engine's exec record says so,
    /// else a look for its marker in the container. Any doubt (the engine away) leaves the
    /// record as it is.
    async fn refresh_detached(&self, mut record: ProcessRecord) -> ProcessRecord {
        let Ok(Some(row)) = self.ctx.store.get(record.chat_id).await else {
            return record;
        };
        let ending = if row.container_id.as_deref() != Some(record.container_id.as_str()) {
            Some((ProcessState::Lost, None))
        } else if row.phase != Phase::Running {
            None
        } else {
            match self.engines.locate(&record.container_id).await {
                Err(_) => None,
                Ok((io, container)) => match io.exec_exit_code(&record.exec_id).await {
                    Ok(None) => None,
                    Ok(Some(code)) => Some((ProcessState::Exited, Some(code))),
                    Err(e) if e.kind() == ErrorKind::NotFound => {
                        match io
                            .signal_marked(&container, &record.marker, "0", SIGNAL_WITHIN)
                            .await
                        {
                            Ok(0) => Some((ProcessState::Lost, None)),
                            _ => None,
                        }
                    }
                    Err(_) => None,
                },
            }
        };
        if let Some((state, exit_code)) = ending {
            let now = Utc::now();
            if let Ok(true) = self
                .ctx
                .store
                .process_end(
                    &record.process_id,
                    state,
                    exit_code,
                    record.output_bytes,
                    now,
                )
                .await
            {
                record.state = state;
                record.exit_code = exit_code;
                record.ended_at = Some(now);
            }
        }
        record
    }

    /// Forgets records (and ended handles) of other sessions and beyond the kept number.
    async fn forget_old(&self, chat_id: ChatId, session: crate::domain::SessionId) {
        let keep = self.ctx.settings.data_plane.processes_kept_ended;
        if let Err(e) = self.ctx.store.processes_prune(chat_id, session, keep).await {
            tracing::warn!(error = %e, "cannot prune process records");
            return;
        }
        if let Ok(kept) = self.ctx.store.processes(chat_id, session).await {
            let ids: Vec<String> = kept.into_iter().map(|r| r.process_id).collect();
            self.processes.retain(chat_id, &ids);
        }
    }
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_signals_and_numbers_reach_the_kill_script() {
        assert_eq!(parse_signal("term").as_deref(), Some("TERM"));
        assert_eq!(parse_signal("SIGINT").as_deref(), Some("INT"));
        assert_eq!(parse_signal("9").as_deref(), Some("9"));
        assert_eq!(parse_signal("64").as_deref(), Some("64"));
        for bad in ["0", "65", "-9", "TERM; rm -rf /", "", "SIG", "$(id)", "1e3"] {
            assert_eq!(parse_signal(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_long_command_is_cut_on_a_character_boundary() {
        assert_eq!(cut("ab€".into(), 3), "ab…");
        assert_eq!(cut("abc".into(), 3), "abc");
    }
}
