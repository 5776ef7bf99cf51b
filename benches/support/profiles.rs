//! Isolation-profile figures (part of the e2e bench): create p50 under runc and under runsc
//! (gVisor), and what egress rules add per create, interleaved on one network; and the cost of
//! writing a fresh rule set to the host (`iptables-restore` + jumps), which the first sandbox of
//! a network pays.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sandboxd::config::ProfileSettings;
use serde_json::json;

use super::{in_process, ms, percentile, verdict, volume, Report};
use crate::support::{new_chat, TestApp};

/// One create under `profile`, timed (the warm figures use it too).
pub(super) async fn create_profile(
    client: &reqwest::Client,
    app: &TestApp,
    profile: &str,
) -> Duration {
    let vol = volume(app);
    let started = Instant::now();
    let r = client
        .post(format!("http://{}/api/v1/create", app.addr))
        .json(&json!({"chat_id": new_chat(), "agent_id": "bench", "volume_host_path": vol, "profile": profile}))
        .send()
        .await
        .expect("create");
    assert_eq!(r.status().as_u16(), 200, "{profile}");
    let _ = r.bytes().await;
    started.elapsed()
}

pub async fn scenario_profiles(out: &mut Report) {
    const ROUNDS: usize = 15;
    let open = ProfileSettings {
        deny_cidrs: vec![],
        ..ProfileSettings::default()
    };
    let gvisor = ProfileSettings {
        runtime: "runsc".into(),
        deny_cidrs: vec![],
        ..ProfileSettings::default()
    };
    let app = in_process("profiles", |s| {
        s.sandbox.profiles = BTreeMap::from([
            ("standard".into(), ProfileSettings::default()),
            ("open".into(), open),
            ("gvisor".into(), gvisor),
        ]);
    })
    .await;
    let client = reqwest::Client::new();
    for p in ["open", "standard", "gvisor"] {
        create_profile(&client, &app, p).await;
    }
    let (mut runc, mut rules, mut runsc) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        runc.push(create_profile(&client, &app, "open").await);
        rules.push(create_profile(&client, &app, "standard").await);
        runsc.push(create_profile(&client, &app, "gvisor").await);
    }
    for v in [&mut runc, &mut rules, &mut runsc] {
        v.sort();
    }
    let (c, r, g) = (
        percentile(&runc, 0.5),
        percentile(&rules, 0.5),
        percentile(&runsc, 0.5),
    );
    out.line(format!(
        "11 create p50 by profile (n={ROUNDS}, interleaved)  runc {:.1} ms  runsc (gVisor) {:.1} ms ({:.2}×)  (measured, no target)",
        ms(c), ms(g), g.as_secs_f64() / c.as_secs_f64()
    ));
    let added = ms(r) - ms(c);
    out.line(format!(
        "12 egress rules per create (steady: rules of the network in place)  runc without rules {:.1} ms, with {:.1} ms → {added:+.1} ms  target ≤5 ms [{}]",
        ms(c), ms(r), verdict(added <= 5.0)
    ));
    drop(app);

    // The first sandbox of a network: writing a fresh rule set (read, then one restore).
    let mut cold = Vec::new();
    for i in 0..10 {
        let instance = format!("bench-rules-{}-{i}", &new_chat()[..6]);
        let desired = sandboxd::egress::desired([(
            "br-benchonly",
            &sandboxd::egress::EgressPolicy {
                egress: sandboxd::egress::EgressMode::Allow,
                allow_cidrs: vec![],
                deny_cidrs: sandboxd::egress::DEFAULT_DENY
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            },
        )]);
        let wanted =
            sandboxd::egress::render(&instance, &desired, &sandboxd::egress::host_resolvers());
        let started = Instant::now();
        let v4 = sandboxd::egress::Family::V4;
        let found = sandboxd::egress::iptables::read(&instance, v4)
            .await
            .expect("read");
        let hooks = v4.hooks(sandboxd::egress::DOCKER_USER);
        let changes = sandboxd::egress::diff(&wanted, &found, false, hooks);
        sandboxd::egress::iptables::apply(&instance, &wanted, &changes, v4)
            .await
            .expect("apply");
        cold.push(started.elapsed());
        sandboxd::egress::iptables::remove(&instance)
            .await
            .expect("remove");
    }
    cold.sort();
    out.line(format!(
        "13 a network's first IPv4 rules (iptables-save + one iptables-restore with the jumps, n=10) p50 {:.1} ms, max {:.1} ms  target ≤5 ms [{}]",
        ms(percentile(&cold, 0.5)),
        ms(*cold.last().unwrap_or(&Duration::ZERO)),
        verdict(percentile(&cold, 0.5) <= Duration::from_millis(5))
    ));
}
