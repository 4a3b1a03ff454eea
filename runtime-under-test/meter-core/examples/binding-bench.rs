//! Binding benchmark: how well medium and strict tell "guest moved within its host" from "guest
//! copied to another host" over random host pairs, and how long sealing and opening take.
//!
//! Run: `cargo run --release -p meter-core --example binding-bench [-- <pairs> [<out.json>]]`.
//! Writes `reports/bench/binding.json` under the workspace root unless told otherwise.

use std::path::PathBuf;
use std::time::Instant;

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use meter_core::binding::{
    BindingEnvelope, BindingPolicy, BindingScheme, ContentKey, Tolerance, open, seal,
};
use meter_core::traits::{MachineKind, MachineTraits, names};
use serde_json::json;
use sha2::{Digest, Sha256};

/// One CPU line: vendor, brand string, family, model, popularity weight, steppings with their microcode revisions.
struct CpuLine {
    vendor: &'static str,
    family: u32,
    model: u32,
    steppings: &'static [(u32, &'static [&'static str])],
    skus: &'static [&'static str],
    popularity: u32,
}

const SKX: &[(u32, &[&str])] = &[(4, &["0x2006e05", "0x2007006", "0x2006f05"])];
const CLX: &[(u32, &[&str])] = &[
    (7, &["0x5003604", "0x5003707", "0x500320a"]),
    (6, &["0x4003604"]),
];
const ICX: &[(u32, &[&str])] = &[(6, &["0xd000389", "0xd0003a5", "0xd0003b9"])];
const SPR: &[(u32, &[&str])] = &[(8, &["0x2b0004b1", "0x2b000590", "0x2b000603"])];
const EMR: &[(u32, &[&str])] = &[(2, &["0x21000283", "0x210002a9"])];
const BDX: &[(u32, &[&str])] = &[(1, &["0xb000038", "0xb000040"])];
const NAPLES: &[(u32, &[&str])] = &[(2, &["0x8001250", "0x800126e"])];
const ROME: &[(u32, &[&str])] = &[(0, &["0x830104d", "0x8301055", "0x8301072"])];
const MILAN: &[(u32, &[&str])] = &[(1, &["0xa0011d1", "0xa0011d3", "0xa0011d5"])];
const GENOA: &[(u32, &[&str])] = &[(1, &["0xa101148", "0xa10114e"])];

const CPU_LINES: &[CpuLine] = &[
    CpuLine {
        vendor: "GenuineIntel",
        family: 6,
        model: 79,
        steppings: BDX,
        skus: &[
            "Intel(R) Xeon(R) CPU E5-2620 v4 @ 2.10GHz",
            "Intel(R) Xeon(R) CPU E5-2630 v4 @ 2.20GHz",
            "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz",
            "Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz",
        ],
        popularity: 1,
    },
    CpuLine {
        vendor: "GenuineIntel",
        family: 6,
        model: 85,
        steppings: SKX,
        skus: &[
            "Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz",
            "Intel(R) Xeon(R) Gold 6140 CPU @ 2.30GHz",
            "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz",
            "Intel(R) Xeon(R) Gold 5118 CPU @ 2.30GHz",
            "Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz",
            "Intel(R) Xeon(R) Silver 4114 CPU @ 2.20GHz",
            "Intel(R) Xeon(R) Platinum 8168 CPU @ 2.70GHz",
        ],
        popularity: 2,
    },
    CpuLine {
        vendor: "GenuineIntel",
        family: 6,
        model: 85,
        steppings: CLX,
        skus: &[
            "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz",
            "Intel(R) Xeon(R) Gold 6238 CPU @ 2.10GHz",
            "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz",
            "Intel(R) Xeon(R) Gold 6252 CPU @ 2.10GHz",
            "Intel(R) Xeon(R) Gold 5218 CPU @ 2.30GHz",
            "Intel(R) Xeon(R) Gold 5220 CPU @ 2.20GHz",
            "Intel(R) Xeon(R) Silver 4210 CPU @ 2.20GHz",
            "Intel(R) Xeon(R) Silver 4214 CPU @ 2.20GHz",
            "Intel(R) Xeon(R) Platinum 8260 CPU @ 2.40GHz",
            "Intel(R) Xeon(R) Platinum 8280 CPU @ 2.70GHz",
        ],
        popularity: 3,
    },
    CpuLine {
        vendor: "GenuineIntel",
        family: 6,
        model: 106,
        steppings: ICX,
        skus: &[
            "Intel(R) Xeon(R) Gold 6330 CPU @ 2.00GHz",
            "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
            "Intel(R) Xeon(R) Gold 6348 CPU @ 2.60GHz",
            "Intel(R) Xeon(R) Gold 5318Y CPU @ 2.10GHz",
            "Intel(R) Xeon(R) Silver 4310 CPU @ 2.10GHz",
            "Intel(R) Xeon(R) Silver 4314 CPU @ 2.40GHz",
            "Intel(R) Xeon(R) Platinum 8358 CPU @ 2.60GHz",
            "Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz",
        ],
        popularity: 3,
    },
    CpuLine {
        vendor: "GenuineIntel",
        family: 6,
        model: 143,
        steppings: SPR,
        skus: &[
            "Intel(R) Xeon(R) Gold 6430",
            "Intel(R) Xeon(R) Gold 6438Y+",
            "Intel(R) Xeon(R) Gold 5418Y",
            "Intel(R) Xeon(R) Silver 4410Y",
            "Intel(R) Xeon(R) Platinum 8460Y+",
            "Intel(R) Xeon(R) Platinum 8480+",
        ],
        popularity: 2,
    },
    CpuLine {
        vendor: "GenuineIntel",
        family: 6,
        model: 207,
        steppings: EMR,
        skus: &[
            "INTEL(R) XEON(R) GOLD 6530",
            "INTEL(R) XEON(R) PLATINUM 8580",
        ],
        popularity: 1,
    },
    CpuLine {
        vendor: "AuthenticAMD",
        family: 23,
        model: 1,
        steppings: NAPLES,
        skus: &[
            "AMD EPYC 7251 8-Core Processor",
            "AMD EPYC 7351 16-Core Processor",
            "AMD EPYC 7601 32-Core Processor",
        ],
        popularity: 1,
    },
    CpuLine {
        vendor: "AuthenticAMD",
        family: 23,
        model: 49,
        steppings: ROME,
        skus: &[
            "AMD EPYC 7282 16-Core Processor",
            "AMD EPYC 7302 16-Core Processor",
            "AMD EPYC 7402 24-Core Processor",
            "AMD EPYC 7452 32-Core Processor",
            "AMD EPYC 7502 32-Core Processor",
            "AMD EPYC 7542 32-Core Processor",
            "AMD EPYC 7702 64-Core Processor",
        ],
        popularity: 2,
    },
    CpuLine {
        vendor: "AuthenticAMD",
        family: 25,
        model: 1,
        steppings: MILAN,
        skus: &[
            "AMD EPYC 7313 16-Core Processor",
            "AMD EPYC 7343 16-Core Processor",
            "AMD EPYC 7413 24-Core Processor",
            "AMD EPYC 7443 24-Core Processor",
            "AMD EPYC 7513 32-Core Processor",
            "AMD EPYC 7543 32-Core Processor",
            "AMD EPYC 7713 64-Core Processor",
            "AMD EPYC 7763 64-Core Processor",
        ],
        popularity: 3,
    },
    CpuLine {
        vendor: "AuthenticAMD",
        family: 25,
        model: 17,
        steppings: GENOA,
        skus: &[
            "AMD EPYC 9124 16-Core Processor",
            "AMD EPYC 9254 24-Core Processor",
            "AMD EPYC 9354 32-Core Processor",
            "AMD EPYC 9454 48-Core Processor",
            "AMD EPYC 9554 64-Core Processor",
            "AMD EPYC 9654 96-Core Processor",
        ],
        popularity: 2,
    },
];

/// Hypervisor CPU exposure variants (host-passthrough, named model, named model with mitigations off).
const FLAG_VARIANTS: &[&str] = &[
    "host-passthrough",
    "named-model",
    "named-model-no-mitigations",
];

/// A host's CPU as its guests see it.
#[derive(Clone, PartialEq, Eq)]
struct HostCpu {
    vendor: &'static str,
    model_name: &'static str,
    family: u32,
    model: u32,
    stepping: u32,
    microcode: &'static str,
    flags: String,
}

fn pick(rng: &mut ChaCha20Rng, n: usize) -> usize {
    usize::try_from(rng.next_u64() % n as u64).unwrap_or(0)
}

/// Draws a host: SKU weighted by its line's popularity, then stepping, microcode and exposure variant uniformly.
fn draw_host(rng: &mut ChaCha20Rng) -> HostCpu {
    let total: u32 = CPU_LINES
        .iter()
        .map(|l| l.popularity * l.skus.len() as u32)
        .sum();
    let mut ticket = u32::try_from(rng.next_u64() % u64::from(total)).unwrap_or(0);
    let (line, sku) = CPU_LINES
        .iter()
        .flat_map(|l| l.skus.iter().map(move |s| (l, *s)))
        .find(|(l, _)| {
            if ticket < l.popularity {
                true
            } else {
                ticket -= l.popularity;
                false
            }
        })
        .expect("ticket within total");
    let (stepping, microcodes) = line.steppings[pick(rng, line.steppings.len())];
    let microcode = microcodes[pick(rng, microcodes.len())];
    let variant = FLAG_VARIANTS[pick(rng, FLAG_VARIANTS.len())];
    let flags = hex::encode(Sha256::digest(
        format!(
            "{}/{}/{}/{}/{variant}",
            line.vendor, line.family, line.model, stepping
        )
        .as_bytes(),
    ));
    HostCpu {
        vendor: line.vendor,
        model_name: sku,
        family: line.family,
        model: line.model,
        stepping,
        microcode,
        flags,
    }
}

fn random_hex(rng: &mut ChaCha20Rng, bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rng.fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A guest's own identity: SMBIOS UUID and serial, a virtio MAC, a virtual disk serial.
struct VmIdentity {
    uuid: String,
    serial: String,
    mac: String,
    disk: String,
}

fn draw_identity(rng: &mut ChaCha20Rng) -> VmIdentity {
    let mut mac = [0u8; 3];
    rng.fill_bytes(&mut mac);
    VmIdentity {
        uuid: random_hex(rng, 16),
        serial: format!("vm-{}", random_hex(rng, 6)),
        mac: format!("52:54:00:{:02x}:{:02x}:{:02x}", mac[0], mac[1], mac[2]),
        disk: format!("drive-{}", random_hex(rng, 8)),
    }
}

fn guest_traits(host: &HostCpu, id: &VmIdentity) -> MachineTraits {
    MachineTraits::new()
        .with(names::CPU_VENDOR, host.vendor)
        .with(names::CPU_MODEL_NAME, host.model_name)
        .with(names::CPU_FAMILY, host.family.to_string())
        .with(names::CPU_MODEL, host.model.to_string())
        .with(names::CPU_STEPPING, host.stepping.to_string())
        .with(names::CPU_MICROCODE, host.microcode)
        .with(names::CPU_FLAGS, host.flags.clone())
        .with(names::PRODUCT_UUID, id.uuid.clone())
        .with(names::PRODUCT_SERIAL, id.serial.clone())
        .with(names::NIC_MAC, vec![id.mac.clone()])
        .with(names::DISK_SERIAL, vec![id.disk.clone()])
}

/// A move within the host: each VM-only trait is renewed with probability 1/2.
fn moved_identity(rng: &mut ChaCha20Rng, id: &VmIdentity) -> VmIdentity {
    let fresh = draw_identity(rng);
    let flip = rng.next_u32();
    VmIdentity {
        uuid: if flip & 1 != 0 {
            fresh.uuid
        } else {
            id.uuid.clone()
        },
        serial: if flip & 2 != 0 {
            fresh.serial
        } else {
            id.serial.clone()
        },
        mac: if flip & 4 != 0 {
            fresh.mac
        } else {
            id.mac.clone()
        },
        disk: if flip & 8 != 0 {
            fresh.disk
        } else {
            id.disk.clone()
        },
    }
}

#[derive(Default)]
struct Tally {
    moved_valid: u64,
    copy_rejected: u64,
    distinguished: u64,
}

fn stats(mut samples: Vec<f64>) -> serde_json::Value {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let at = |q: f64| samples[((n as f64 - 1.0) * q).round() as usize];
    json!({
        "count": n,
        "mean": samples.iter().sum::<f64>() / n as f64,
        "p50": at(0.50),
        "p99": at(0.99),
        "max": samples[n - 1],
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let pairs: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let out = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../reports/bench/binding.json")
    });
    let seed = [0x5e; 32];
    let mut rng = ChaCha20Rng::from_seed(seed);
    let tolerances = [Tolerance::Loose, Tolerance::Medium, Tolerance::Strict];
    let mut tallies: Vec<Tally> = tolerances.iter().map(|_| Tally::default()).collect();
    let mut seal_ms = Vec::new();
    let mut open_ms = Vec::new();
    let mut identical_host_cpu = 0u64;

    for _ in 0..pairs {
        let host_a = draw_host(&mut rng);
        let host_b = draw_host(&mut rng);
        identical_host_cpu += u64::from(host_a == host_b);
        let identity = draw_identity(&mut rng);
        let original = guest_traits(&host_a, &identity);
        let moved = guest_traits(&host_a, &moved_identity(&mut rng, &identity));
        let copied = guest_traits(&host_b, &identity);
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let key = ContentKey::from_bytes(key);

        for (tolerance, tally) in tolerances.iter().zip(tallies.iter_mut()) {
            let mut entropy = [0u8; 32];
            rng.fill_bytes(&mut entropy);
            let policy = BindingPolicy {
                scheme: BindingScheme::Smartbind,
                tolerance: *tolerance,
            };
            let started = Instant::now();
            let envelope: BindingEnvelope =
                seal(&key, &original, MachineKind::Guest, &policy, entropy)?;
            seal_ms.push(started.elapsed().as_secs_f64() * 1e3);

            let started = Instant::now();
            let moved_ok = open(&envelope, &moved).is_ok_and(|k| k == key);
            open_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let copy_ok = open(&envelope, &copied).is_ok_and(|k| k == key);
            open_ms.push(started.elapsed().as_secs_f64() * 1e3);

            tally.moved_valid += u64::from(moved_ok);
            tally.copy_rejected += u64::from(!copy_ok);
            tally.distinguished += u64::from(moved_ok && !copy_ok);
        }
    }

    let rate = |n: u64| n as f64 / pairs as f64;
    let mut detection = serde_json::Map::new();
    for (tolerance, tally) in tolerances.iter().zip(&tallies) {
        let name = serde_json::to_value(tolerance)?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        detection.insert(
            name,
            json!({
                "moved-within-host-valid": rate(tally.moved_valid),
                "copy-to-other-host-rejected": rate(tally.copy_rejected),
                "copy-to-other-host-valid": rate(pairs - tally.copy_rejected),
                "wanted": if *tolerance == Tolerance::Loose {
                    "copy valid (portable licence)"
                } else {
                    "move valid, copy rejected"
                },
                "distinguished": rate(tally.distinguished),
            }),
        );
    }
    let goal = 0.98;
    let medium = rate(tallies[1].distinguished);
    let strict = rate(tallies[2].distinguished);
    let seal_stats = stats(seal_ms);
    let open_stats = stats(open_ms);
    let report = json!({
        "benchmark": "binding",
        "pairs": pairs,
        "seed": hex::encode(seed),
        "distribution": {
            "cpu-skus": CPU_LINES.iter().map(|l| l.skus.len()).sum::<usize>(),
            "cpu-lines": CPU_LINES.len(),
            "flag-variants": FLAG_VARIANTS.len(),
            "move-within-host": "each VM-only trait renewed with probability 1/2",
            "copy": "same VM identity, host-derived traits of an independently drawn host",
            "pairs-with-identical-host-cpu-traits": rate(identical_host_cpu),
        },
        "detection": detection,
        "goal": { "distinguished": goal, "medium-met": medium > goal, "strict-met": strict > goal },
        "seal-ms": seal_stats,
        "open-ms": open_stats,
        "targets-ms": { "seal": 50.0, "open": 5.0 },
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", out.display());
    Ok(())
}
