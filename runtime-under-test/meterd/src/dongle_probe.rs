//! `meter dongle probe`: finds the dongles this machine's platform sees, opens a session with one
//! exactly as the dongle manager does, and times request/response round trips through its
//! transport (a sim socket or a hidraw node).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use dongle::{Request, Response, RuntimeId, VerifyingKey};
use meter_core::firm_certificate::FirmCertificate;
use serde::Serialize;

use crate::dongles::{self, Link};
use crate::outcome::{EXIT_OK, Outcome};
use crate::{platform, transport};

/// `meter dongle` subcommands: the dongles attached to this machine.
#[derive(Debug, Subcommand)]
pub enum LocalDongleCommand {
    /// Open a session with an attached dongle and time request round trips.
    ///
    /// Binds the dongle to --runtime-id, reads its items, then sends --count clock reads (the
    /// keep-alive request) one after another, and closes the session. The bind is real: a meterd
    /// using the same dongle loses it (binding-broken, until a re-plug), and a bind while another
    /// runtime is active trips the shared-use lockout. Probe a dongle no runtime is using; on
    /// hidraw, where every opener shares the one USB connection, stop meterd first.
    Probe(ProbeArgs),
}

/// Arguments of `meter dongle probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Where to look for dongles: `host` (hidraw devices) or `sim:<dir>` (the sim's usb/ sockets).
    #[arg(long, default_value = "host")]
    pub platform: String,
    /// The dongle to probe [default: the first one listed, by serial].
    #[arg(long)]
    pub serial: Option<String>,
    /// Request/response round trips to time.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// A vendor's firm certificate (`meter root certify`; e.g. firm.cert) whose vendor may
    /// certify the dongle, checked against the roots this runtime carries; repeatable.
    #[arg(long = "vendor", value_name = "FIRM_CERT")]
    pub vendors: Vec<PathBuf>,
    /// A meterd state folder whose trusted firm certificates (trust/<firm>.cert) certify the dongle.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// The runtime id the probe binds the dongle to (with a key derived from it).
    #[arg(long, default_value = "meter-probe")]
    pub runtime_id: String,
}

/// One dongle endpoint the platform listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbedEndpoint {
    /// Serial as the platform names it.
    pub serial: String,
    /// Socket or device node.
    pub path: PathBuf,
}

/// What `meter dongle probe` found and measured (its `--json` document).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    /// The platform asked (`host` or `sim:<dir>`).
    pub platform: String,
    /// Where the platform looked for dongles.
    pub scanned: String,
    /// Every dongle endpoint the platform listed, by serial.
    pub endpoints: Vec<ProbedEndpoint>,
    /// Serial of the probed dongle, as the platform names it.
    pub serial: String,
    /// Its socket or device node.
    pub path: PathBuf,
    /// `socket` or `hidraw`.
    pub transport: &'static str,
    /// The serial in the dongle's vendor certificate.
    pub certified_serial: String,
    /// Items programmed in the dongle.
    pub items: usize,
    /// Milliseconds from opening the transport to an open session with the items read.
    pub session_ms: f64,
    /// Round trips timed.
    pub round_trips: u32,
    /// Median round trip, milliseconds.
    pub rtt_p50_ms: f64,
    /// 90th percentile round trip, milliseconds.
    pub rtt_p90_ms: f64,
    /// Slowest round trip, milliseconds.
    pub rtt_max_ms: f64,
    /// Round trips completed per second, back to back.
    pub round_trips_per_s: f64,
}

/// Runs a `meter dongle` command.
pub async fn run(json_mode: bool, command: LocalDongleCommand) -> anyhow::Result<Outcome> {
    match command {
        LocalDongleCommand::Probe(args) => {
            let report = probe(&args).await?;
            if json_mode {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", human(&report));
            }
            Ok(Outcome { code: EXIT_OK })
        }
    }
}

/// Finds the dongle, opens a session with it and times `args.count` round trips.
pub async fn probe(args: &ProbeArgs) -> anyhow::Result<ProbeReport> {
    let runtime = RuntimeId::new(args.runtime_id.clone())
        .with_context(|| format!("Cannot bind dongles as {:?}", args.runtime_id))?;
    let platform = platform::from_spec(&args.platform)?;
    let scanned = platform.usb_scanned();
    let endpoints = platform
        .usb_endpoints()
        .with_context(|| format!("Cannot list dongles: scanned {scanned}"))?;
    let endpoint = match &args.serial {
        Some(serial) => endpoints
            .iter()
            .find(|e| &e.serial == serial)
            .with_context(|| {
                format!(
                    "No dongle with serial {serial} on {}: scanned {scanned}, found [{}]",
                    platform.describe(),
                    endpoints
                        .iter()
                        .map(|e| e.serial.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?,
        None => endpoints.first().with_context(|| {
            format!(
                "No dongle found on {}: scanned {scanned}",
                platform.describe()
            )
        })?,
    }
    .clone();
    let path = endpoint.path.display().to_string();
    let keys = trusted_keys(args)?;

    let started = Instant::now();
    let transport = transport::open(&endpoint)
        .with_context(|| format!("Cannot open dongle {} at {path}", endpoint.serial))?;
    let kind = transport.kind();
    let link = Link::start(transport, || {})
        .with_context(|| format!("Cannot start the link to dongle {}", endpoint.serial))?;
    let key = probe_key(&runtime);
    let (identity, items) = link.open(runtime, &key, keys).await.with_context(|| {
        format!(
            "Cannot open a session with dongle {} at {path}",
            endpoint.serial
        )
    })?;
    let session = started.elapsed();

    let mut samples = Vec::with_capacity(args.count as usize);
    let all = Instant::now();
    for done in 0..args.count {
        let sent = Instant::now();
        match link.call(&Request::ReadClock).await.with_context(|| {
            format!(
                "Round trip {} of {} with dongle {} failed",
                done + 1,
                args.count,
                endpoint.serial
            )
        })? {
            Response::Clock { .. } => samples.push(sent.elapsed()),
            other => anyhow::bail!(
                "Dongle {} answered a clock read with {other:?}",
                endpoint.serial
            ),
        }
    }
    let elapsed = all.elapsed();
    // End politely: the dongle then counts this runtime as inactive.
    if let Err(error) = link.call(&Request::Close).await {
        tracing::debug!(%error, "Probe session not closed");
    }
    let summary = RoundTrips::of(&samples);
    Ok(ProbeReport {
        platform: platform.describe(),
        scanned,
        endpoints: endpoints
            .iter()
            .map(|e| ProbedEndpoint {
                serial: e.serial.clone(),
                path: e.path.clone(),
            })
            .collect(),
        serial: endpoint.serial.clone(),
        path: endpoint.path.clone(),
        transport: kind.name(),
        certified_serial: identity.serial.to_string(),
        items: items.len(),
        session_ms: millis(session),
        round_trips: args.count,
        rtt_p50_ms: summary.p50_ms,
        rtt_p90_ms: summary.p90_ms,
        rtt_max_ms: summary.max_ms,
        round_trips_per_s: round3(f64::from(args.count) / elapsed.as_secs_f64().max(1e-9)),
    })
}

/// The key the probe proves to the dongle: from the id it binds as and no secret, so probes
/// under one id are one runtime to the dongle (a diagnostic holds no secret worth keeping).
fn probe_key(runtime: &RuntimeId) -> dongle::SigningKey {
    crate::runtime_identity::dongle_key(&[0; 32], runtime.as_str())
}

/// The vendor keys given by --vendor and --state; at least one is needed to trust a dongle.
fn trusted_keys(args: &ProbeArgs) -> anyhow::Result<Vec<VerifyingKey>> {
    let mut keys = Vec::new();
    for path in &args.vendors {
        let bytes =
            std::fs::read(path).with_context(|| format!("Cannot read {}", path.display()))?;
        let name = path.display().to_string();
        let vendor = FirmCertificate::from_json(&bytes, &name)
            .and_then(|certificate| {
                crate::trust_roots::vendor_of(&certificate, certificate.firm, &name)
            })
            .with_context(|| format!("{name} is not a firm certificate this runtime trusts"))?;
        keys.push(vendor.signing_key());
    }
    if let Some(state) = &args.state {
        keys.extend(dongles::trusted_vendor_keys(state).into_values());
    }
    if keys.is_empty() {
        anyhow::bail!(
            "No vendor key to check the dongle's certificate: give --vendor <firm.cert> or --state <meterd state folder with trust/<firm>.cert>"
        );
    }
    Ok(keys)
}

/// Percentiles of a run of round trips, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RoundTrips {
    p50_ms: f64,
    p90_ms: f64,
    max_ms: f64,
}

impl RoundTrips {
    /// Nearest-rank percentiles; all zero for no samples.
    fn of(samples: &[Duration]) -> Self {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let rank = |q: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            millis(sorted[index])
        };
        Self {
            p50_ms: rank(0.5),
            p90_ms: rank(0.9),
            max_ms: rank(1.0),
        }
    }
}

/// Milliseconds to the microsecond.
fn millis(duration: Duration) -> f64 {
    round3(duration.as_secs_f64() * 1000.0)
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

fn human(report: &ProbeReport) -> String {
    format!(
        "dongle {} at {} ({}), certified serial {}\nsession open in {:.3} ms ({} items)\n{} round trips: p50 {:.3} ms, p90 {:.3} ms, max {:.3} ms, {:.1} per second",
        report.serial,
        report.path.display(),
        report.transport,
        report.certified_serial,
        report.session_ms,
        report.items,
        report.round_trips,
        report.rtt_p50_ms,
        report.rtt_p90_ms,
        report.rtt_max_ms,
        report.round_trips_per_s,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[rstest::rstest]
    #[case::one(&[7], (7.0, 7.0, 7.0))]
    #[case::ten(&[10, 1, 9, 2, 8, 3, 7, 4, 6, 5], (5.0, 9.0, 10.0))]
    #[case::twenty((1..=20).collect::<Vec<u64>>().leak(), (10.0, 18.0, 20.0))]
    #[case::none(&[], (0.0, 0.0, 0.0))]
    fn round_trip_percentiles_are_nearest_rank(
        #[case] millis_each: &[u64],
        #[case] expected: (f64, f64, f64),
    ) {
        let samples: Vec<Duration> = millis_each
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        let summary = RoundTrips::of(&samples);
        assert_eq!((summary.p50_ms, summary.p90_ms, summary.max_ms), expected);
    }

    #[test]
    fn human_output_names_the_dongle_and_its_timings() {
        let report = ProbeReport {
            platform: "host".into(),
            scanned: "/sys/class/hidraw".into(),
            endpoints: vec![],
            serial: "4711".into(),
            path: "/dev/hidraw0".into(),
            transport: "hidraw",
            certified_serial: "4711".into(),
            items: 2,
            session_ms: 3.25,
            round_trips: 20,
            rtt_p50_ms: 0.5,
            rtt_p90_ms: 0.75,
            rtt_max_ms: 1.0,
            round_trips_per_s: 1900.0,
        };
        assert_eq!(
            human(&report),
            "dongle 4711 at /dev/hidraw0 (hidraw), certified serial 4711\n\
             session open in 3.250 ms (2 items)\n\
             20 round trips: p50 0.500 ms, p90 0.750 ms, max 1.000 ms, 1900.0 per second"
        );
    }

    #[test]
    fn no_vendor_key_is_a_clear_error() {
        let args = ProbeArgs {
            platform: "host".into(),
            serial: None,
            count: 1,
            vendors: vec![],
            state: None,
            runtime_id: "meter-probe".into(),
        };
        let error = trusted_keys(&args).unwrap_err().to_string();
        assert!(error.contains("--vendor"), "{error}");
    }
}
