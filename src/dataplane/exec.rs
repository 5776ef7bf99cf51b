//! Exec: runs a command in a running sandbox with a deadline. Every process the command
//! starts inherits a per-exec marker variable; at the deadline (or when a streaming client
//! goes away) every process carrying it is killed with SIGKILL from inside the container,
//! so a child that detached or ignores SIGTERM dies too. Abandoning the attach stream alone
//! would leave them running. A timed-out exec answers exit code 124, like `timeout(1)`.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::output::{Capture, Utf8Chunker};
use super::{Caller, DataPlane, DataPlaneError, Result, Target};
use crate::backend::io::{ExecChunk, ExecSpec, SandboxIo, EXEC_MARKER_VAR};
use crate::domain::ChatId;
use crate::store::{EventAction, EventOutcome};

/// How these calls name themselves in a resume's event.
const CALL: &str = "exec";

/// The exit code of a command killed at its timeout.
pub const TIMEOUT_EXIT_CODE: i64 = 124;
/// How long the kill of a timed-out exec may take.
const KILL_WITHIN: Duration = Duration::from_secs(10);
/// After the kill, how long to wait for the output stream to close.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(3);
/// Longest command text kept in the audit log.
const AUDIT_COMMAND_BYTES: usize = 1024;

/// A checked exec request.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The argv; a string command arrives as `["sh", "-c", text]`.
    pub argv: Vec<String>,
    /// `NAME=value` (the marker is added here, not by the client).
    pub env: Vec<String>,
    /// A client path (relative to the chat mount, or absolute on a mount).
    pub workdir: Option<String>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
}

/// How an exec ended.
#[derive(Debug, Clone)]
pub struct ExecEnd {
    pub exit_code: i64,
    pub timed_out: bool,
    pub duration: Duration,
    /// The client went away before the end: the command was killed.
    pub abandoned: bool,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// After a timeout or abandonment: whether the kill left no marked process.
    pub killed: Option<bool>,
}

/// A started exec, before its output is pumped.
struct Begun {
    exec: crate::backend::io::StartedExec,
    marker: String,
    started: Instant,
    deadline: Instant,
}

/// A buffered exec's answer.
#[derive(Debug)]
pub struct ExecOutput {
    pub end: ExecEnd,
    pub stdout: Capture,
    pub stderr: Capture,
}

/// What a streamed exec sends.
#[derive(Debug)]
pub enum ExecEvent {
    Chunk(ExecChunk),
    End(ExecEnd),
    Failed(DataPlaneError),
}

impl DataPlane {
    /// Runs a command to its end (or timeout), keeping output up to the configured cap. It
    /// runs on its own task: a caller that goes away (a client hanging up) gets its command
    /// killed and audited instead of left running.
    pub async fn exec(
        &self,
        chat_id: ChatId,
        req: ExecRequest,
        caller: &Caller,
    ) -> Result<ExecOutput> {
        let (target, slot) = self.target(chat_id, CALL).await?;
        let begun = self.begin(&target, &req).await?;
        let (alive, caller_gone) = tokio::sync::oneshot::channel::<()>();
        let (this, caller) = (self.clone(), caller.clone());
        let task = tokio::spawn(async move {
            let _slot = slot;
            let limit = this.ctx.settings.data_plane.exec_output_limit_bytes;
            let (mut stdout, mut stderr) = (Capture::new(limit), Capture::new(limit));
            let end = this
                .finish(
                    &target,
                    &req,
                    &caller,
                    begun,
                    |chunk| {
                        match chunk {
                            ExecChunk::Stdout(b) => stdout.push(&b),
                            ExecChunk::Stderr(b) => stderr.push(&b),
                        }
                        std::future::ready(true)
                    },
                    async move {
                        let _ = caller_gone.await;
                    },
                )
                .await?;
            Ok(ExecOutput {
                end,
                stdout,
                stderr,
            })
        });
        let out = task
            .await
            .map_err(|e| DataPlaneError::Engine(format!("exec task failed: {e}")))?;
        drop(alive);
        out
    }

    /// Runs a command and sends its output as it comes (chunks never split a UTF-8
    /// character), then its end. A receiver that goes away kills the command. Failures
    /// before the command runs (a bad `workdir`, the engine away, the sandbox gone) are
    /// returned, not sent.
    pub async fn exec_stream(
        &self,
        chat_id: ChatId,
        req: ExecRequest,
        caller: Caller,
    ) -> Result<mpsc::Receiver<ExecEvent>> {
        let (target, slot) = self.target(chat_id, CALL).await?;
        let begun = self.begin(&target, &req).await?;
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            let limit = this.ctx.settings.data_plane.exec_output_limit_bytes as u64;
            let mut sent = 0u64;
            // Shared with the sink, so what they hold back at the end can still be sent.
            let chunkers = std::sync::Arc::new(std::sync::Mutex::new((
                Utf8Chunker::default(),
                Utf8Chunker::default(),
            )));
            let sink_chunkers = chunkers.clone();
            let sink_tx = tx.clone();
            let watch_tx = tx.clone();
            let result = this
                .finish(
                    &target,
                    &req,
                    &caller,
                    begun,
                    move |chunk| {
                        let chunk = match sink_chunkers.lock() {
                            Ok(mut c) => match chunk {
                                ExecChunk::Stdout(b) => ExecChunk::Stdout(c.0.push(&b).into()),
                                ExecChunk::Stderr(b) => ExecChunk::Stderr(c.1.push(&b).into()),
                            },
                            Err(_) => chunk,
                        };
                        let len = match &chunk {
                            ExecChunk::Stdout(b) | ExecChunk::Stderr(b) => b.len() as u64,
                        };
                        // Past the cap the output is dropped (the end still comes).
                        let keep = len > 0 && sent < limit.saturating_mul(2);
                        sent += len;
                        let tx = sink_tx.clone();
                        // A slow client slows the command (through its pipe); the deadline holds.
                        async move {
                            if keep {
                                tx.send(ExecEvent::Chunk(chunk)).await.is_ok()
                            } else {
                                !tx.is_closed()
                            }
                        }
                    },
                    async move { watch_tx.closed().await },
                )
                .await;
            // A client that stopped reading must not hold the slot while the end waits.
            drop(slot);
            let rest = chunkers
                .lock()
                .map(|mut c| {
                    let (out, err) = std::mem::take(&mut *c);
                    (out.finish(), err.finish())
                })
                .unwrap_or_default();
            for chunk in [
                ExecChunk::Stdout(rest.0.into()),
                ExecChunk::Stderr(rest.1.into()),
            ] {
                let empty =
                    matches!(&chunk, ExecChunk::Stdout(b) | ExecChunk::Stderr(b) if b.is_empty());
                if !empty {
                    let _ = tx.send(ExecEvent::Chunk(chunk)).await;
                }
            }
            let last = match result {
                Ok(end) => ExecEvent::End(end),
                Err(e) => ExecEvent::Failed(e),
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), tx.send(last)).await;
        });
        Ok(rx)
    }

    /// Checks the working directory and starts the command with its marker variable.
    async fn begin(&self, t: &Target, req: &ExecRequest) -> Result<Begun> {
        let workdir = t
            .mounts
            .resolve(req.workdir.as_deref().unwrap_or(t.mounts.workdir()), None)?;
        let marker = format!("{EXEC_MARKER_VAR}={}", uuid::Uuid::new_v4().simple());
        let started = Instant::now();
        let spec = ExecSpec {
            cmd: req.argv.clone(),
            env: session_env(&req.env, &t.env, &marker),
            workdir: workdir.absolute,
            stdin: req.stdin.is_some(),
            tty: false,
        };
        let mut exec =
            t.io.start_exec(&t.container_id, spec)
                .await
                .map_err(|e| DataPlaneError::engine(e, None))?;
        if let (Some(mut input), Some(data)) = (exec.input.take(), req.stdin.clone()) {
            tokio::spawn(async move {
                // A command that exits without reading its stdin closes the pipe: not an error.
                let _ = input.write_all(&data).await;
                let _ = input.shutdown().await;
            });
        }
        Ok(Begun {
            exec,
            marker,
            started,
            deadline: started + req.timeout,
        })
    }

    /// Pumps output into `sink` until the stream ends, the deadline passes or the consumer
    /// is `gone`; kills the command's processes in the last two cases (and when the output
    /// stream breaks), and audits every ending.
    async fn finish<F, G>(
        &self,
        t: &Target,
        req: &ExecRequest,
        caller: &Caller,
        begun: Begun,
        mut sink: impl FnMut(ExecChunk) -> F + Send,
        gone: G,
    ) -> Result<ExecEnd>
    where
        F: std::future::Future<Output = bool> + Send,
        G: std::future::Future<Output = ()> + Send,
    {
        let Begun {
            mut exec,
            marker,
            started,
            deadline,
        } = begun;
        let mut gone = std::pin::pin!(gone);
        let (mut stdout_bytes, mut stderr_bytes) = (0u64, 0u64);
        let mut count = |c: &ExecChunk| match c {
            ExecChunk::Stdout(b) => stdout_bytes += b.len() as u64,
            ExecChunk::Stderr(b) => stderr_bytes += b.len() as u64,
        };
        let (mut timed_out, mut abandoned, mut broken) = (false, false, None);
        loop {
            tokio::select! {
                item = exec.output.next() => match item {
                    Some(Ok(chunk)) => {
                        count(&chunk);
                        match tokio::time::timeout_at(deadline, sink(chunk)).await {
                            Ok(true) => {}
                            Ok(false) => {
                                abandoned = true;
                                break;
                            }
                            Err(_) => {
                                timed_out = true;
                                break;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        broken = Some(DataPlaneError::engine(e, None));
                        break;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    timed_out = true;
                    break;
                }
                _ = &mut gone => {
                    abandoned = true;
                    break;
                }
            }
        }
        let mut killed = None;
        if timed_out || abandoned || broken.is_some() {
            killed = Some(self.kill(t, &exec.id, &marker).await);
            // What the command wrote before it died still counts.
            let drain = async {
                while let Some(Ok(chunk)) = exec.output.next().await {
                    count(&chunk);
                    if !abandoned && !sink(chunk).await {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_AFTER_KILL, drain).await;
        }
        let exit_code = if timed_out || abandoned {
            Ok(TIMEOUT_EXIT_CODE)
        } else if let Some(e) = broken {
            Err(e)
        } else {
            self.exit_code(t, &exec.id).await
        };
        let end = ExecEnd {
            exit_code: *exit_code.as_ref().unwrap_or(&-1),
            timed_out,
            duration: started.elapsed(),
            abandoned,
            stdout_bytes,
            stderr_bytes,
            killed,
        };
        let result = match (&exit_code, timed_out, abandoned) {
            (Err(_), _, _) => "error",
            (_, true, _) => "timeout",
            (_, _, true) => "abandoned",
            _ => "ok",
        };
        self.ctx
            .metrics
            .exec_total
            .get_or_create(&crate::metrics::ResultLabel { result })
            .inc();
        self.audit_exec(t, caller, req, &end, exit_code.as_ref().err())
            .await;
        exit_code.map(|_| end)
    }

    /// Kills every process of an exec (once its process exists); whether none is left.
    async fn kill(&self, t: &Target, exec_id: &str, marker: &str) -> bool {
        t.io.wait_exec_started(exec_id, KILL_WITHIN).await;
        match t.io.kill_marked(&t.container_id, marker, KILL_WITHIN).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(chat_id = %t.chat_id, "exec kill: processes remained after the kill loop");
                false
            }
            Err(e) => {
                tracing::warn!(chat_id = %t.chat_id, error = %e, "exec kill failed");
                false
            }
        }
    }

    async fn exit_code(&self, t: &Target, exec_id: &str) -> Result<i64> {
        exit_code_of(t.io.as_ref(), exec_id).await
    }

    async fn audit_exec(
        &self,
        t: &Target,
        caller: &Caller,
        req: &ExecRequest,
        end: &ExecEnd,
        failed: Option<&DataPlaneError>,
    ) {
        let mut command = serde_json::to_string(&req.argv).unwrap_or_default();
        if command.len() > AUDIT_COMMAND_BYTES {
            let mut cut = AUDIT_COMMAND_BYTES;
            while !command.is_char_boundary(cut) {
                cut -= 1;
            }
            command.truncate(cut);
            command.push('…');
        }
        let outcome = if end.timed_out {
            EventOutcome::Timeout
        } else if end.abandoned || failed.is_some() {
            EventOutcome::Error
        } else {
            EventOutcome::Ok
        };
        let detail = json!({
            "command": command,
            "exit_code": end.exit_code,
            "timed_out": end.timed_out,
            "abandoned": end.abandoned,
            "duration_ms": end.duration.as_millis() as u64,
            "stdout_bytes": end.stdout_bytes,
            "stderr_bytes": end.stderr_bytes,
            "stdin_bytes": req.stdin.as_ref().map_or(0, Vec::len),
            "killed": end.killed,
            "error": failed.map(ToString::to_string),
        });
        self.audit(t, caller, EventAction::Exec, outcome, detail)
            .await;
    }
}

/// An exec's environment: the request's variables win over the session's (the first of a
/// name is the one a process sees, so the session's come only for names the request leaves
/// out), and the marker last.
pub(super) fn session_env(request: &[String], session: &[String], marker: &str) -> Vec<String> {
    let named = |e: &String| e.split('=').next().unwrap_or_default().to_string();
    let given: std::collections::HashSet<String> = request.iter().map(named).collect();
    let mut env = request.to_vec();
    env.extend(
        session
            .iter()
            .filter(|e| !given.contains(&named(e)))
            .cloned(),
    );
    env.push(marker.to_string());
    env
}

/// The exit code once the engine has it (it may lag the stream's end by a moment).
pub(super) async fn exit_code_of(io: &dyn SandboxIo, exec_id: &str) -> Result<i64> {
    for attempt in 0..100u32 {
        match io.exec_exit_code(exec_id).await {
            Ok(Some(code)) => return Ok(code),
            Ok(None) => {
                tokio::time::sleep(Duration::from_millis(u64::from(attempt.min(10)) * 2)).await
            }
            Err(e) => return Err(DataPlaneError::engine(e, None)),
        }
    }
    Err(DataPlaneError::Engine(
        "the exec's output ended but the engine still reports it running".into(),
    ))
}
