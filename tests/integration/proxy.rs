//! A fault-injecting proxy in front of the real Docker socket. sandboxd is pointed at the
//! proxy's socket; the test can then take "the engine" away (every connection is accepted and
//! dropped at once, and counted, so retry rates can be measured), hide the event stream, or
//! slow down / fail the requests that mention one chat — while the real engine keeps serving
//! the other tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

#[derive(Default)]
struct Faults {
    down: AtomicBool,
    hide_events: AtomicBool,
    /// Requests containing this text are held back this long.
    slow: Mutex<Option<(String, Duration)>>,
    /// Requests containing this text get a 500.
    fail: Mutex<Option<String>>,
    /// Connections accepted while down.
    refused: AtomicU64,
    /// Bumped when the engine is taken down: open connections with an older epoch are cut.
    epoch: AtomicU64,
}

pub struct DockerProxy {
    pub socket: PathBuf,
    faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

impl DockerProxy {
    pub async fn start(dir: &Path) -> Self {
        let socket = dir.join("docker-proxy.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind proxy socket");
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if f.down.load(Ordering::SeqCst) {
                    f.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                tokio::spawn(serve(client, f.clone()));
            }
        });
        Self {
            socket,
            faults,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Takes the engine away (cutting open connections) or brings it back.
    pub fn set_down(&self, down: bool) {
        if down {
            self.faults.epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.faults.down.store(down, Ordering::SeqCst);
    }

    /// Connections accepted and dropped while down.
    pub fn refused(&self) -> u64 {
        self.faults.refused.load(Ordering::SeqCst)
    }

    pub fn hide_events(&self, hide: bool) {
        self.faults.hide_events.store(hide, Ordering::SeqCst);
        if hide {
            self.faults.epoch.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn slow_down(&self, needle: &str, delay: Duration) {
        *self.faults.slow.lock().unwrap() = Some((needle.to_string(), delay));
    }

    pub fn fail(&self, needle: Option<&str>) {
        *self.faults.fail.lock().unwrap() = needle.map(str::to_string);
    }
}

impl Drop for DockerProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn serve(mut client: UnixStream, f: Arc<Faults>) {
    let Ok(mut engine) = UnixStream::connect(crate::support::engine().socket()).await else {
        return;
    };
    let epoch = f.epoch.load(Ordering::SeqCst);
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    loop {
        let cut = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if f.epoch.load(Ordering::SeqCst) != epoch {
                    return;
                }
            }
        };
        tokio::select! {
            _ = cut => return,
            n = client.read(&mut up) => {
                let Ok(n) = n else { return };
                if n == 0 { return; }
                let chunk = &up[..n];
                let text = String::from_utf8_lossy(chunk);
                if f.hide_events.load(Ordering::SeqCst) && text.contains("/events") {
                    return;
                }
                let failing = f.fail.lock().unwrap().clone();
                if let Some(needle) = failing {
                    if text.contains(&needle) {
                        let body = r#"{"message":"injected failure"}"#;
                        let answer = format!(
                            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = client.write_all(answer.as_bytes()).await;
                        return;
                    }
                }
                let slow = f.slow.lock().unwrap().clone();
                if let Some((needle, delay)) = slow {
                    if text.contains(&needle) {
                        tokio::time::sleep(delay).await;
                    }
                }
                if engine.write_all(chunk).await.is_err() { return; }
            }
            n = engine.read(&mut down) => {
                let Ok(n) = n else { return };
                if n == 0 { return; }
                if client.write_all(&down[..n]).await.is_err() { return; }
            }
        }
    }
}
