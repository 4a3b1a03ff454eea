//! The network server's register of client runtimes: which key each runtime id is bound to,
//! which runtime owns each machine name, and how many runtimes each peer address brought.
//!
//! A runtime id is bound to the certificate it first authenticated with; the same id from another
//! key is refused. The station a remote grant counts for is named from the authenticated runtime:
//! the first runtime to present a machine name owns it, and any other runtime presenting that name
//! is counted apart, as `<name>~<its runtime id's first 8 digits>`.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use meter_core::reason::Reason;

use crate::store::Change;

/// Metadata key prefix of runtime id → key fingerprint bindings.
const KEY_PREFIX: &str = "runtime-key/";
/// Metadata key prefix of machine name → owning runtime id.
const NAME_PREFIX: &str = "station-name/";

/// How many new runtime ids one peer address may bind while the server runs.
pub const MAX_RUNTIMES_PER_PEER: u32 = 1024;
/// Longest runtime id or machine name accepted in a hello.
const MAX_NAME_LEN: usize = 64;

/// Runtime bindings and station names, as loaded from the state and grown by hellos.
#[derive(Debug, Default)]
pub struct StationRegistry {
    keys: HashMap<String, String>,
    names: HashMap<String, String>,
    bound_by_peer: HashMap<IpAddr, u32>,
}

/// A hello the register accepted.
#[derive(Debug)]
pub struct Admission {
    /// The machine part of the stations this runtime's grants count for.
    pub station_machine: String,
    /// What to record durably.
    pub changes: Vec<Change>,
}

impl StationRegistry {
    /// The register kept in the state's metadata.
    pub fn load(meta: &BTreeMap<String, Vec<u8>>) -> Self {
        let mut registry = StationRegistry::default();
        for (key, value) in meta {
            let value = String::from_utf8_lossy(value).into_owned();
            if let Some(runtime) = key.strip_prefix(KEY_PREFIX) {
                registry.keys.insert(runtime.to_owned(), value);
            } else if let Some(name) = key.strip_prefix(NAME_PREFIX) {
                registry.names.insert(name.to_owned(), value);
            }
        }
        registry
    }

    /// Checks a hello from `runtime`, authenticated with the key `fingerprint`, naming its machine
    /// `machine`, from `peer`; binds what is new. `trust_claims` (a weakened build only) takes the
    /// runtime id and machine name as the client says.
    pub fn admit(
        &mut self,
        runtime: &str,
        fingerprint: &str,
        machine: &str,
        peer: IpAddr,
        trust_claims: bool,
        limit_peers: bool,
    ) -> Result<Admission, Reason> {
        if !valid_name(runtime) || !valid_name(machine) {
            return Err(Reason::StationRefused);
        }
        let mut changes = Vec::new();
        match self.keys.get(runtime) {
            Some(bound) if bound == fingerprint || trust_claims => {}
            Some(_) => return Err(Reason::StationRefused),
            None => {
                let bound = self.bound_by_peer.entry(peer).or_default();
                if limit_peers && *bound >= MAX_RUNTIMES_PER_PEER {
                    return Err(Reason::StationRefused);
                }
                *bound += 1;
                self.keys.insert(runtime.to_owned(), fingerprint.to_owned());
                changes.push(Change::PutMeta(
                    format!("{KEY_PREFIX}{runtime}"),
                    fingerprint.as_bytes().to_vec(),
                ));
            }
        }
        let station_machine = if trust_claims {
            machine.to_owned()
        } else {
            match self.names.get(machine) {
                Some(owner) if owner == runtime => machine.to_owned(),
                Some(_) => format!("{machine}~{}", &runtime[..runtime.len().min(8)]),
                None => {
                    self.names.insert(machine.to_owned(), runtime.to_owned());
                    changes.push(Change::PutMeta(
                        format!("{NAME_PREFIX}{machine}"),
                        runtime.as_bytes().to_vec(),
                    ));
                    machine.to_owned()
                }
            }
        };
        Ok(Admission {
            station_machine,
            changes,
        })
    }
}

/// A runtime id or machine name: 1 to 64 printable ASCII characters without spaces or `/`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 2, 1));

    #[test]
    fn an_id_from_another_key_is_refused_and_the_binding_survives_a_restart() {
        let mut registry = StationRegistry::default();
        let first = registry
            .admit("r1", "key-a", "vm1", PEER, false, true)
            .unwrap();
        assert_eq!(first.station_machine, "vm1");
        assert_eq!(
            registry
                .admit("r1", "key-b", "vm1", PEER, false, true)
                .unwrap_err(),
            Reason::StationRefused
        );
        let meta: BTreeMap<String, Vec<u8>> = first
            .changes
            .into_iter()
            .filter_map(|c| match c {
                Change::PutMeta(k, v) => Some((k, v)),
                _ => None,
            })
            .collect();
        let mut reloaded = StationRegistry::load(&meta);
        assert!(
            reloaded
                .admit("r1", "key-b", "vm1", PEER, false, true)
                .is_err()
        );
        assert!(
            reloaded
                .admit("r1", "key-a", "vm1", PEER, false, true)
                .is_ok()
        );
    }

    #[test]
    fn a_second_runtime_naming_a_taken_machine_is_counted_apart() {
        let mut registry = StationRegistry::default();
        registry
            .admit("aaaaaaaa11", "key-a", "vm1", PEER, false, true)
            .unwrap();
        let other = registry
            .admit("bbbbbbbb22", "key-b", "vm1", PEER, false, true)
            .unwrap();
        assert_eq!(other.station_machine, "vm1~bbbbbbbb");
        // A weakened build takes the claim as it comes.
        let trusted = registry
            .admit("bbbbbbbb22", "key-c", "vm1", PEER, true, true)
            .unwrap();
        assert_eq!(trusted.station_machine, "vm1");
    }

    #[test]
    fn one_address_binds_a_bounded_number_of_runtimes() {
        let mut registry = StationRegistry::default();
        for i in 0..MAX_RUNTIMES_PER_PEER {
            registry
                .admit(&format!("r{i}"), "k", &format!("m{i}"), PEER, false, true)
                .unwrap();
        }
        assert!(
            registry
                .admit("one-more", "k", "m", PEER, false, true)
                .is_err()
        );
        // Known runtimes still come back.
        assert!(registry.admit("r0", "k", "m0", PEER, false, true).is_ok());
        assert!(
            registry
                .admit("bad/name", "k", "m", PEER, false, false)
                .is_err()
        );
    }
}
