//! plan() cost: a converged world of N desired rows × N observed containers (the steady state
//! every resync pass plans over), at N = 1,000, 5,000 and 10,000. Target: ≤ 5 ms at 10,000,
//! growing linearly. Run: `cargo bench --bench plan`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sandboxd::planner::plan;

#[path = "support/world.rs"]
mod world;

fn bench_plan(c: &mut Criterion) {
    let mut group = c.benchmark_group("plan_converged");
    let now = chrono::Utc::now();
    for n in [1_000usize, 5_000, 10_000] {
        let (d, o) = world::converged(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| plan(std::hint::black_box(&d), std::hint::black_box(&o), now))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
