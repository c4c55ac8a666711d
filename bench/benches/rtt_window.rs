//! Cost of the RTT bookkeeping: recording a sample and summarising a window (what a scrape or
//! an instance choice does per peer).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use control::rtt::{RttTable, RttWindow, WindowShape};
use criterion::{Criterion, criterion_group, criterion_main};
use libp2p::PeerId;

fn window(c: &mut Criterion) {
    let now = Instant::now();
    let mut window = RttWindow::new(WindowShape::default(), now);
    let mut i = 0u64;
    c.bench_function("rtt_window/record", |b| {
        b.iter(|| {
            i = i.wrapping_add(7919);
            window.record(now, Duration::from_micros(100 + i % 50_000));
        })
    });
    c.bench_function("rtt_window/summary", |b| {
        b.iter(|| black_box(window.summary(now)))
    });

    let table = RttTable::new(WindowShape::default());
    let peers: Vec<PeerId> = (0..50).map(|_| PeerId::random()).collect();
    for (n, peer) in peers.iter().enumerate() {
        table.record(*peer, Duration::from_millis(n as u64 + 1), now);
    }
    c.bench_function("rtt_table/record_50_peers", |b| {
        b.iter(|| {
            for peer in &peers {
                table.record(*peer, Duration::from_millis(3), now);
            }
        })
    });
    c.bench_function("rtt_table/snapshot_50_peers", |b| {
        b.iter(|| black_box(table.snapshot(now)))
    });
}

criterion_group!(benches, window);
criterion_main!(benches);
