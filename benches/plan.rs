//! plan() cost: a converged world of N desired rows × N observed containers (the steady state
//! every resync pass plans over), at N = 1,000, 5,000 and 10,000. Target: ≤ 5 ms at 10,000,
//! growing linearly. Run: `cargo bench --bench plan`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sandboxd::domain::{ChatId, Phase, SessionId};
use sandboxd::planner::{plan, Desired, Observed};

fn world(n: usize) -> (Vec<Desired>, Vec<Observed>) {
    let now = chrono::Utc::now();
    let mut d = Vec::with_capacity(n);
    let mut o = Vec::with_capacity(n);
    for i in 0..n {
        let chat = ChatId(uuid::Uuid::from_u128(i as u128 + 1));
        let session = SessionId(uuid::Uuid::from_u128((i as u128 + 1) << 64));
        let id = format!("{i:064x}");
        d.push(Desired {
            chat_id: chat,
            session_id: session,
            spec_hash: "h".repeat(64),
            expires_at: now + chrono::Duration::hours(1),
            deleted: false,
            phase: Phase::Running,
            container_id: Some(id.clone()),
            endpoint_ip: Some("10.0.0.1".into()),
            next_attempt_at: None,
        });
        o.push(Observed {
            container_id: id,
            chat_id: Some(chat),
            session_id: Some(session),
            spec_hash: Some("h".repeat(64)),
            running: true,
            ip: Some("10.0.0.1".into()),
        });
    }
    (d, o)
}

fn bench_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_converged");
    let now = chrono::Utc::now();
    for n in [1_000usize, 5_000, 10_000] {
        let (d, o) = world(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| plan(std::hint::black_box(&d), std::hint::black_box(&o), now))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
