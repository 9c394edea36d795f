//! What homicro costs, side by side with a plain Mosquitto and with the bus
//! alone (`serve --no-registry`), each started by the bench in the same
//! run. See docs/BENCHMARKS.md for the figures and what they mean.
//!
//! ```sh
//! cargo bench --bench bench                      # every item, ~8 minutes
//! cargo bench --bench bench -- --quick           # every item at small N (CI)
//! cargo bench --bench bench -- --only 1,3 --runs 5
//! cargo bench --bench bench -- --only 3 --storm 20000
//! cargo bench --bench bench -- --only 4,7 --connections 20000
//! HOMICRO_BENCH_CONFIG=my.toml cargo bench ...   # serve --config my.toml
//! HOMICRO_BENCH_WRAP="heaptrack -o /tmp/h-{kind}" cargo bench ...   # serve under a profiler
//! HOMICRO_BENCH_DUMP=/tmp/d cargo bench -- --only 2   # item 2's latencies, in send order
//! HOMICRO_BENCH_KINDS=homicro cargo bench -- --only 2   # one subject only (profiling)
//! ```
//!
//! Items: 1 registrations/s, 2 propagation at 1,000 msg/s, 3 connection
//! storm, 4 memory with 100,000 records, 5 snapshot, 6 expiry lateness,
//! 7 memory growth after short-lived connections (with 4), 8 churn, 9
//! trust on (password file, ACL and TLS, for both brokers), 10 durability
//! (the journal's cost against none and a persistent Mosquitto; restart),
//! 11 the hub (`/svc/` and `homicro proxy` against reaching the service
//! directly), 12 calls through the hub (MQTT and the long poll against the
//! same request/response by hand).
//! Each figure is the median of `--runs` runs (default 3), the subjects
//! taking turns within each run. Targets are printed as met / not met;
//! nothing here asserts.

mod calls;
mod churn;
mod durability;
mod expiry;
mod hub;
mod load;
mod memory;
mod propagation;
mod report;
mod snapshot;
mod storm;
mod subject;
mod throughput;
mod trust;
mod wire;

pub struct Opts {
    pub quick: bool,
    pub runs: usize,
    only: Option<Vec<u32>>,
    /// Item 7's number of short-lived connections.
    pub connections: Option<usize>,
    /// Item 3's number of clients.
    pub storm: Option<usize>,
}

impl Opts {
    fn wants(&self, item: u32) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&item))
    }

    /// `full`, or `quick` with --quick.
    pub fn n(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let quick = args.iter().any(|a| a == "--quick");
    let o = Opts {
        quick,
        runs: arg("--runs")
            .and_then(|r| r.parse().ok())
            .unwrap_or(if quick { 1 } else { 3 }),
        only: arg("--only").map(|o| o.split(',').filter_map(|x| x.parse().ok()).collect()),
        connections: arg("--connections").and_then(|c| c.parse().ok()),
        storm: arg("--storm").and_then(|c| c.parse().ok()),
    };
    println!(
        "# homicro bench: {} cores, load average {}, median of {} runs per figure{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        o.runs,
        if quick {
            ", --quick (small N: proves it runs; not the targets' N)"
        } else {
            ""
        }
    );
    let started = std::time::Instant::now();
    let mut report = report::Report::default();
    if o.wants(1) {
        throughput::run(&o, &mut report).await;
    }
    if o.wants(2) {
        propagation::run(&o, &mut report).await;
    }
    if o.wants(3) {
        storm::run(&o, &mut report).await;
    }
    if o.wants(4) || o.wants(7) {
        memory::run(&o, &mut report, o.wants(7)).await;
    }
    if o.wants(5) {
        snapshot::run(&o, &mut report).await;
    }
    if o.wants(6) {
        expiry::run(&o, &mut report).await;
    }
    if o.wants(8) {
        churn::run(&o, &mut report).await;
    }
    if o.wants(9) {
        trust::run(&o, &mut report).await;
    }
    if o.wants(10) {
        durability::run(&o, &mut report).await;
    }
    if o.wants(11) {
        hub::run(&o, &mut report).await;
    }
    if o.wants(12) {
        calls::run(&o, &mut report).await;
    }
    report.print();
    println!(
        "\n# done in {:.0} s; load average {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

/// The machine's 1, 5 and 15 minute load averages: other work on the
/// same cores shows up in every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
