//! Chat storage (docs/storage.md): an attachment written and read through the API against
//! `cp` of the same bytes on the same (workspace) file system; the usage query of a workspace
//! holding 10,000 files; what a workspace's file system adds to a sandbox create (the chat and
//! workspace lookups, the mount check, the spec's chat directory); making a workspace.

use std::path::Path;
use std::time::{Duration, Instant};

use sandboxd::domain::spec::{ContainerSpec, MountKind};
use sandboxd::domain::ChatId;
use serde_json::{json, Value};

use super::support::TestApp;
use super::{in_process, ms, percentile, verdict, Report};

const MIB: usize = 1 << 20;

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    percentile(&v, 0.5)
}

async fn timed<F: std::future::Future>(f: F) -> (Duration, F::Output) {
    let t = Instant::now();
    let out = f.await;
    (t.elapsed(), out)
}

/// `cp` of `from` to `to` (then `sync -f`, as the API's write ends with fsyncs).
fn cp(from: &Path, to: &Path) -> Duration {
    let t = Instant::now();
    let ok = std::process::Command::new("cp")
        .arg(from)
        .arg(to)
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new("sync")
            .arg("-f")
            .arg(to)
            .status()
            .is_ok_and(|s| s.success());
    assert!(ok, "cp {} {}", from.display(), to.display());
    t.elapsed()
}

async fn post(app: &TestApp, path: &str, body: Value) -> Value {
    let r = app
        .client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.expect("json")
}

pub async fn scenario_storage(out: &mut Report) {
    let app = in_process("storage", |s| {
        s.data_plane.file_write_limit_bytes = 128 * MIB;
    })
    .await;
    let (made, ws) = timed(post(
        &app,
        "/api/v1/workspaces",
        json!({"user_id": "bench", "quota_bytes": 4u64 << 30}),
    ))
    .await;
    let ws = ws["workspace_id"].as_str().expect("id").to_string();
    out.line(format!(
        "storage: a 4 GiB workspace made (image, mkfs, mount, reserve) in {:.1} ms",
        ms(made)
    ));
    let chat = post(&app, &format!("/api/v1/workspaces/{ws}/chats"), json!({})).await;
    let chat = chat["chat_id"].as_str().expect("chat").to_string();
    let dir = app
        .settings
        .storage
        .root
        .join("mnt")
        .join(&ws)
        .join("chats")
        .join(&chat);

    for (size, rounds) in [(MIB, 20), (100 * MIB, 3)] {
        let bytes = vec![0x5au8; size];
        let source = dir.join("source.bin");
        std::fs::write(&source, &bytes).expect("source");
        let (mut api_w, mut cp_w, mut api_r, mut cp_r) = (vec![], vec![], vec![], vec![]);
        for i in 0..rounds {
            let url = app.url(&format!("/api/v1/chats/{chat}/files/a{i}.bin"));
            let (took, r) = timed(app.client.put(&url).body(bytes.clone()).send()).await;
            assert!(r.expect("put").status().is_success());
            api_w.push(took);
            cp_w.push(cp(&source, &dir.join(format!("c{i}.bin"))));
            let (took, body) = timed(async {
                app.client
                    .get(&url)
                    .send()
                    .await
                    .expect("get")
                    .bytes()
                    .await
                    .expect("body")
            })
            .await;
            assert_eq!(body.len(), size);
            api_r.push(took);
            cp_r.push(cp(&dir.join(format!("c{i}.bin")), Path::new("/dev/null")));
            for name in [format!("a{i}.bin"), format!("c{i}.bin")] {
                let _ = app
                    .client
                    .delete(app.url(&format!("/api/v1/chats/{chat}/files/{name}")))
                    .send()
                    .await;
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
        let _ = std::fs::remove_file(&source);
        let label = if size == MIB { "1 MiB" } else { "100 MiB" };
        let (aw, cw, ar, cr) = (p50(api_w), p50(cp_w), p50(api_r), p50(cp_r));
        out.line(format!(
            "9 storage write {label} p50 (n={rounds})  API {:.1} ms  cp+sync {:.1} ms  ratio {:.2}",
            ms(aw),
            ms(cw),
            aw.as_secs_f64() / cw.as_secs_f64()
        ));
        out.line(format!(
            "9 storage read {label} p50 (n={rounds})  API {:.1} ms  cp {:.1} ms  ratio {:.2}",
            ms(ar),
            ms(cr),
            ar.as_secs_f64() / cr.as_secs_f64()
        ));
    }

    // Usage with 10,000 files: one statvfs, whatever the count.
    for i in 0..10_000 {
        std::fs::write(dir.join(format!("n{i}.txt")), b"x").expect("file");
    }
    let mut usage = Vec::new();
    for _ in 0..50 {
        let (took, r) = timed(
            app.client
                .get(app.url(&format!("/api/v1/workspaces/{ws}")))
                .send(),
        )
        .await;
        assert!(r.expect("get").status().is_success());
        usage.push(took);
    }
    let u = p50(usage);
    out.line(format!(
        "9 storage usage query with 10,000 files p50 (n=50)  {:.2} ms (GET of the workspace, HTTP included)",
        ms(u)
    ));

    // What a workspace chat adds to a create: the lookups, the mount check, the spec's
    // chat directory (the store and storage calls the create path makes, timed alone).
    // The same database through a pool of the bench's own (the app's is inside it).
    let store =
        sandboxd::store::Store::open(&app.settings.database.path, Duration::from_secs(5), 2)
            .await
            .expect("store");
    let storage = sandboxd::storage::ChatStorage::new(&app.settings.storage.root);
    let chat_id: ChatId = chat.parse().expect("chat id");
    let spec = sandboxd::config::spec::resolve(
        &app.settings.sandbox,
        chat_id,
        "agent",
        Path::new("/tmp"),
        None,
    )
    .to_json();
    let mut added = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let c = store.chat(chat_id).await.expect("chat").expect("known");
        let w = store
            .workspace(c.workspace_id)
            .await
            .expect("workspace")
            .expect("known");
        storage
            .ensure_workspace(w.workspace_id, w.quota_bytes)
            .await
            .expect("mounted");
        let mut s = ContainerSpec::from_json(&spec).expect("spec");
        for m in &mut s.mounts {
            if m.kind == MountKind::Chat {
                m.source = storage
                    .chat_dir(c.workspace_id, c.chat_id)
                    .display()
                    .to_string();
            }
        }
        std::hint::black_box((s.to_json(), s.hash()));
        added.push(t.elapsed());
    }
    let a = p50(added);
    out.line(format!(
        "9 storage create overhead of a workspace chat p50 (n=200)  {:.3} ms  target ≤5 ms [{}]",
        ms(a),
        verdict(a <= Duration::from_millis(5))
    ));
}
