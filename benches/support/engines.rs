//! Create → running through sandboxd on each engine (Docker, Podman), against the raw API's
//! create + start + inspect of the very same container body (the backend's own builder, so
//! Podman's limits and tmpfs are in both), interleaved round by round so both engines see
//! the same machine. `scripts/bench.sh engines` brings Podman up.

use std::time::Duration;

use bollard::Docker;
use sandboxd::config::RuntimeKind;

use super::support::{new_chat, remove_containers_with, TestApp};
use super::{create, in_process, ms, percentile, verdict, volume, MatchedRaw, Report};

const ROUNDS: usize = 20;

struct Side {
    name: &'static str,
    docker: Docker,
    app: TestApp,
    vol: std::path::PathBuf,
    matched: MatchedRaw,
    matched_instance: String,
    raw: Vec<Duration>,
    ours: Vec<Duration>,
}

async fn side(name: &'static str, runtime: RuntimeKind, socket: &str) -> Side {
    let url = format!("unix://{socket}");
    let docker = Docker::connect_with_unix(socket, 120, bollard::API_DEFAULT_VERSION)
        .expect("socket")
        .negotiate_version()
        .await
        .expect("the engine answers");
    let u = url.clone();
    let app = in_process(&format!("eng-{name}"), move |s| {
        s.runtime = runtime;
        s.docker.base_url = u;
    })
    .await;
    let vol = volume(&app);
    let matched_instance = format!("{}-matched", app.instance());
    let matched = MatchedRaw::new_on(&matched_instance, move |s| {
        s.runtime = runtime;
        s.docker.base_url = url;
    })
    .await;
    Side {
        name,
        docker,
        app,
        vol,
        matched,
        matched_instance,
        raw: Vec::new(),
        ours: Vec::new(),
    }
}

pub async fn scenario_engines(out: &mut Report) {
    let mut sides = vec![
        side("docker", RuntimeKind::Docker, "/var/run/docker.sock").await,
        side("podman", RuntimeKind::Podman, "/run/podman/podman.sock").await,
    ];
    let client = reqwest::Client::new();
    // One of each first: the image and network are warm for both.
    for s in &sides {
        create(&client, s.app.addr, &new_chat(), &s.vol).await;
        s.matched.start(&s.docker, 10_000).await;
    }
    for i in 0..ROUNDS {
        for s in sides.iter_mut() {
            s.raw.push(s.matched.start(&s.docker, i).await);
            let (status, took) = create(&client, s.app.addr, &new_chat(), &s.vol).await;
            assert_eq!(status, 200, "{} create", s.name);
            s.ours.push(took);
        }
    }
    for s in sides.iter_mut() {
        s.raw.sort();
        s.ours.sort();
        let (r50, o50) = (percentile(&s.raw, 0.5), percentile(&s.ours, 0.5));
        let ratio = o50.as_secs_f64() / r50.as_secs_f64();
        out.line(format!(
            "8 {:6} create→running p50 (n={ROUNDS})  same container raw {:7.1} ms  sandboxd {:7.1} ms  ratio {ratio:.3}  p95 {:.1}/{:.1} ms  target ≤1.05× [{}]",
            s.name,
            ms(r50),
            ms(o50),
            ms(percentile(&s.raw, 0.95)),
            ms(percentile(&s.ours, 0.95)),
            verdict(ratio <= 1.05)
        ));
    }
    for s in sides {
        // Each side's containers, with its own engine's tool (the harness's clean-up knows
        // only the engine of SANDBOXD_TEST_ENGINE).
        let instance = s.app.instance().to_string();
        drop(s.app);
        for inst in [instance.as_str(), s.matched_instance.as_str()] {
            remove_containers_with(s.name, &format!("label=sandboxd.instance={inst}"));
        }
    }
}
