//! Cost of one instance choice: what the proxy spends per request deciding where it goes.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use proxy::{
    config::perf::{DEFAULT_LIMITS, Policy, Tuning},
    select::Chooser,
};

fn choose(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("choose");
    for policy in [Policy::RttHistogram, Policy::PeakEwma, Policy::RoundRobin] {
        for instances in [3usize, 20] {
            let mut chooser = Chooser::new(Tuning {
                policy,
                ..Tuning::DEFAULT
            });
            for i in 0..instances {
                chooser.add(i, now);
                for s in 0..50 {
                    chooser.record_rtt(
                        &i,
                        Duration::from_micros(500 + (i * 997 + s * 31) as u64 % 15_000),
                        now,
                    );
                }
            }
            let mut seed = 0x2545_f491_u64;
            let mut random = move |n: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            group.bench_with_input(
                BenchmarkId::new(format!("{policy:?}"), instances),
                &instances,
                |b, _| b.iter(|| black_box(chooser.choose(now, DEFAULT_LIMITS, &mut random))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, choose);
criterion_main!(benches);
