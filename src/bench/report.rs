//! What `tally bench` prints: a run's summary, as JSON ([`Serialize`]) and as a table
//! ([`Display`](fmt::Display)); and the flood report's table.

use std::fmt;

use serde::Serialize;

use super::flood::FloodReport;
use super::{median, Load, Measurement, Mode, Target};

/// A run of `tally bench`: the medians of its rounds, per target.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What was measured.
    pub mode: Mode,
    /// Connections (throughput, idle) or workers (reconnect).
    pub connections: usize,
    /// Request payload in bytes.
    pub payload: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Seconds per measurement.
    pub duration_s: f64,
    /// Measurements per target.
    pub rounds: usize,
    /// One row per target, in the order measured.
    pub targets: Vec<Row>,
}

/// One target's medians, and its ratios to the plain echo's (when one was measured).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The target's name.
    pub target: String,
    /// Its server processes.
    pub pids: Vec<u32>,
    /// Requests (or reconnects) per second.
    pub per_sec: Option<f64>,
    /// Latency, microseconds: median.
    pub p50_us: Option<f64>,
    /// 99th percentile.
    pub p99_us: Option<f64>,
    /// 99.9th percentile.
    pub p999_us: Option<f64>,
    /// Server CPU per operation, microseconds.
    pub server_cpu_us: Option<f64>,
    /// `per_sec` over the plain echo's.
    pub rate_over_plain: Option<f64>,
    /// `server_cpu_us` over the plain echo's.
    pub cpu_over_plain: Option<f64>,
    /// Idle mode: resident bytes per session.
    pub rss_per_session: Option<f64>,
    /// Every round's measurement.
    pub rounds: Vec<Measurement>,
}

/// The median of `f` over the rounds where it has a value.
fn med(ms: &[Measurement], f: impl Fn(&Measurement) -> Option<f64>) -> Option<f64> {
    let xs: Vec<f64> = ms.iter().filter_map(f).collect();
    (!xs.is_empty()).then(|| median(xs))
}

impl Summary {
    /// The summary of `runs` (per target, its rounds) of `load`, `rounds` each; ratios
    /// are to the target named `plain`.
    pub fn new(
        load: &Load,
        rounds: usize,
        targets: &[Target],
        runs: &[Vec<Measurement>],
    ) -> Summary {
        let plain = targets.iter().position(|t| t.name == "plain");
        let plain_rate = plain.and_then(|i| med(&runs[i], |m| Some(m.per_sec)));
        let plain_cpu = plain.and_then(|i| med(&runs[i], |m| m.server_cpu_us));
        let targets = targets
            .iter()
            .zip(runs)
            .map(|(t, ms)| {
                let rate = med(ms, |m| Some(m.per_sec));
                let cpu = med(ms, |m| m.server_cpu_us);
                Row {
                    target: t.name.clone(),
                    pids: t.pids.clone(),
                    per_sec: rate,
                    p50_us: med(ms, |m| Some(m.p50_us as f64)),
                    p99_us: med(ms, |m| Some(m.p99_us as f64)),
                    p999_us: med(ms, |m| Some(m.p999_us as f64)),
                    server_cpu_us: cpu,
                    rate_over_plain: rate.zip(plain_rate).map(|(a, b)| a / b),
                    cpu_over_plain: cpu.zip(plain_cpu).map(|(a, b)| a / b),
                    rss_per_session: med(ms, |m| m.rss_per_session.map(|r| r as f64)),
                    rounds: ms.clone(),
                }
            })
            .collect();
        Summary {
            mode: load.mode,
            connections: load.connections,
            payload: load.payload,
            depth: load.depth,
            duration_s: load.duration.as_secs_f64(),
            rounds,
            targets,
        }
    }
}

/// `-` for a missing figure.
fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.decimals$}"))
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mode {:?}, {} connections, {} B payload, depth {}, {} s x {} rounds, interleaved (medians)",
            self.mode, self.connections, self.payload, self.depth, self.duration_s, self.rounds
        )?;
        if self.mode == Mode::Idle {
            let per = self
                .targets
                .first()
                .and_then(|r| r.rss_per_session)
                .unwrap_or(0.0);
            return writeln!(
                f,
                "daemon resident memory per idle session: {:.0} bytes ({:.2} KiB) at {} sessions",
                per,
                per / 1024.0,
                self.connections
            );
        }
        let unit = match self.mode {
            Mode::Reconnect => "reconnects/s",
            _ => "requests/s",
        };
        writeln!(
            f,
            "{:<10} {:>13} {:>8} {:>8} {:>9} {:>12} {:>8} {:>8}",
            "target", unit, "p50 us", "p99 us", "p99.9 us", "CPU us/op", "x rate", "x CPU"
        )?;
        for r in &self.targets {
            writeln!(
                f,
                "{:<10} {:>13} {:>8} {:>8} {:>9} {:>12} {:>8} {:>8}",
                r.target,
                num(r.per_sec, 0),
                num(r.p50_us, 0),
                num(r.p99_us, 0),
                num(r.p999_us, 0),
                num(r.server_cpu_us, 2),
                num(r.rate_over_plain, 3),
                num(r.cpu_over_plain, 3),
            )?;
        }
        if !self.targets.iter().any(|r| r.target == "plain") {
            writeln!(
                f,
                "(give --plain ADDR for the ratios against a plain TCP echo)"
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for FloodReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "flood {:?}: {} attacker connections from {} addresses, {:.0} opened/s, daemon CPU {} per attacker connection",
            self.attack,
            self.attackers,
            self.sources,
            self.attack_conns_per_sec,
            self.server_cpu_us_per_attack_conn
                .map_or("(give --daemon-pid)".into(), |c| format!("{c:.1} us"))
        )?;
        writeln!(
            f,
            "{:<8} {:>9} {:>9} {:>10} {:>10}",
            "devices", "attempts", "success", "p50 us", "p99 us"
        )?;
        for (name, d) in [("calm", &self.calm), ("flood", &self.flood)] {
            writeln!(
                f,
                "{:<8} {:>9} {:>8.2}% {:>10} {:>10}",
                name, d.attempts, d.success_pct, d.p50_us, d.p99_us
            )?;
        }
        writeln!(
            f,
            "p99 under flood / calm: {:.2}; recovery after the flood: {} ms",
            self.p99_ratio, self.recovery_ms
        )
    }
}
