//! Benchmark of the in-memory dongle path (host session ↔ 64-byte reports ↔ firmware).
//! Writes `reports/bench/dongle.json` at the workspace root.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dongle::{
    DevicePort, Firmware, Flash, ItemCounting, ProductItem, ReportAssembler, Request, RuntimeId,
    Serial, Session, SessionError, SigningKey, encode_reports,
};

const T0: u64 = 1_700_000_000_000;
const ESTABLISH_RUNS: u32 = 300;
const ROUND_TRIPS: u32 = 20_000;
const REBIND_RUNS: u32 = 200;

/// A dongle reached through one port, with reports both ways.
struct Link {
    firmware: Firmware,
    port: DevicePort,
    assembler: ReportAssembler,
    now: u64,
}

impl Link {
    fn exchange(&mut self, frame: &[u8]) -> Vec<u8> {
        let mut reply = None;
        for report in encode_reports(frame).expect("frame fits") {
            for back in self
                .port
                .receive_report(&mut self.firmware, &report, self.now)
            {
                if let Some(frame) = self.assembler.push(&back).expect("valid reports") {
                    reply = Some(frame);
                }
            }
        }
        reply.expect("dongle answers")
    }

    fn connect(&mut self, runtime: &RuntimeId, secret: [u8; 32], vendor: &SigningKey) -> Session {
        let (mut session, hello) = Session::start(
            runtime.clone(),
            &runtime_key(runtime),
            secret,
            vec![vendor.verifying_key()],
        );
        let reply = self.exchange(&hello);
        session.accept(&reply).expect("handshake");
        session
    }

    fn call(
        &mut self,
        session: &mut Session,
        request: &Request,
    ) -> Result<dongle::Response, SessionError> {
        let frame = session.request(request)?;
        let reply = self.exchange(&frame);
        session.receive(&reply)
    }
}

fn secret(index: u32) -> [u8; 32] {
    let mut secret = [0x5a; 32];
    secret[..4].copy_from_slice(&index.to_le_bytes());
    secret
}

fn percentile(samples: &mut [Duration], fraction: f64) -> f64 {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * fraction).round() as usize;
    samples[index].as_secs_f64() * 1_000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vendor = SigningKey::from_bytes(&[0x11; 32]);
    let mut flash = Flash::manufacture(Serial(1), [0x22; 32], [0x33; 32], &vendor);
    flash.program_item(
        &vendor,
        ProductItem {
            firm: 10,
            code: 1001,
            name: "bench".into(),
            quantity: 1,
            counting: ItemCounting::UserLimit,
            expires_at: None,
            units: Some(u64::MAX),
            deny_virtual_machines: false,
            deny_terminal_server: false,
        },
    )?;
    let mut link = Link {
        firmware: Firmware::power_on(flash, T0),
        port: DevicePort::new(),
        assembler: ReportAssembler::new(),
        now: T0,
    };
    let vm1 = RuntimeId::new("bench-vm1")?;
    let vm2 = RuntimeId::new("bench-vm2")?;

    // Session establishment: hello → accept, closing each session so reconnects are not rebinds.
    let mut establish = Vec::new();
    for run in 0..ESTABLISH_RUNS {
        let started = Instant::now();
        let mut session = link.connect(&vm1, secret(run), &vendor);
        establish.push(started.elapsed());
        link.call(&mut session, &Request::Close)?;
        link.now += 1;
    }

    // Frames per second: request/response round trips of a small command.
    let mut session = link.connect(&vm1, secret(u32::MAX), &vendor);
    let started = Instant::now();
    for _ in 0..ROUND_TRIPS {
        link.call(&mut session, &Request::ReadClock)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let round_trips_per_s = f64::from(ROUND_TRIPS) / elapsed;
    let mut metered = Duration::ZERO;
    for _ in 0..ROUND_TRIPS / 10 {
        let started = Instant::now();
        link.call(
            &mut session,
            &Request::DecrementUnits {
                firm: 10,
                code: 1001,
                units: 1,
            },
        )?;
        metered += started.elapsed();
    }
    let decrements_per_s = f64::from(ROUND_TRIPS / 10) / metered.as_secs_f64();

    // Rebind → old holder sees BindingBroken: the new runtime's hello plus the old runtime's next frame.
    let mut rebind = Vec::new();
    let mut old = session;
    for run in 0..REBIND_RUNS {
        link.now += 61_000; // past the active window and the rebind window
        let (name, other) = if run % 2 == 0 {
            (&vm2, &vm1)
        } else {
            (&vm1, &vm2)
        };
        let started = Instant::now();
        let new = link.connect(name, secret(run + 10_000), &vendor);
        match link.call(&mut old, &Request::ReadClock) {
            Err(SessionError::BindingBroken) => {}
            other_result => {
                return Err(
                    format!("expected binding-broken for {other}, got {other_result:?}").into(),
                );
            }
        }
        rebind.push(started.elapsed());
        old = new;
    }

    let report = serde_json::json!({
        "component": "dongle",
        "path": "in-memory: host Session -> 64-byte HID reports -> DevicePort -> Firmware and back",
        "session_establishment_ms": {
            "runs": ESTABLISH_RUNS,
            "p50": percentile(&mut establish, 0.5),
            "p99": percentile(&mut establish, 0.99),
            "target_max": 5.0,
        },
        "frames_per_second": {
            "round_trips": ROUND_TRIPS,
            "round_trips_per_second": round_trips_per_s,
            "frames_per_second": round_trips_per_s * 2.0,
            "unit_decrements_per_second": decrements_per_s,
        },
        "rebind_to_binding_broken_ms": {
            "runs": REBIND_RUNS,
            "p50": percentile(&mut rebind, 0.5),
            "p99": percentile(&mut rebind, 0.99),
            "target_max": 100.0,
            "note": "dongle-side latency only; a runtime notices at its next frame, so add its keep-alive interval",
        },
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("dongle.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("written to {}", path.canonicalize()?.display());
    Ok(())
}

/// A key per bench runtime, from its name.
fn runtime_key(runtime: &RuntimeId) -> SigningKey {
    let mut seed = [0u8; 32];
    for (slot, byte) in seed.iter_mut().zip(runtime.as_str().bytes().cycle()) {
        *slot = byte;
    }
    SigningKey::from_bytes(&seed)
}
