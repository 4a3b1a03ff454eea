//! The id this runtime goes by with dongles and network servers.
//!
//! The random part is created once and kept in the state folder, so it travels with a copy of
//! that folder. The id also names the machine (its firmware UUID): a guest cloned together with
//! its runtime state is another runtime, to a dongle (a hop between them is a rebind) and to a
//! server (its own station). A perfect copy, UUID and all, cannot be told apart.
//!
//! The runtime also proves a key to dongles at every hello, derived from a second stored secret
//! and the id: a runtime that presents another's id (a modified runtime) has another key, and the
//! dongle tells the two apart.

use dongle::SigningKey;
use sha2::{Digest, Sha256};

/// The runtime id from the stored random part and the machine's firmware UUID, if it has one.
pub fn runtime_id(stored: &str, machine_uuid: Option<&str>) -> String {
    let machine = match machine_uuid {
        Some(uuid) if !crate::weakened::is(crate::weakened::Defence::CloneRuntimeId) => uuid,
        // Weakened (or no UUID to name): the stored part alone, copied with the state.
        _ => return stored.to_owned(),
    };
    let mut hash = Sha256::new();
    hash.update(b"meter-runtime-id-v1\0");
    hash.update(stored.as_bytes());
    hash.update([0]);
    hash.update(machine.trim().to_ascii_lowercase().as_bytes());
    hex::encode(&hash.finalize()[..16])
}

/// The key this runtime proves to dongles: from its stored secret and the id it goes by.
pub fn dongle_key(secret: &[u8; 32], runtime_id: &str) -> SigningKey {
    let mut hash = Sha256::new();
    hash.update(b"meter-runtime-key-v1\0");
    if !crate::weakened::is(crate::weakened::Defence::DongleRuntimeKey) {
        hash.update(secret);
    }
    // Weakened: from the id alone, which anyone who reads `meter status` knows.
    hash.update(runtime_id.as_bytes());
    SigningKey::from_bytes(&hash.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dongle_key_needs_the_secret_not_only_the_id() {
        let id = "00112233445566778899aabbccddeeff";
        let mine = dongle_key(&[1; 32], id);
        assert_eq!(mine.to_bytes(), dongle_key(&[1; 32], id).to_bytes());
        assert_ne!(mine.to_bytes(), dongle_key(&[2; 32], id).to_bytes());
        assert_ne!(
            mine.to_bytes(),
            dongle_key(&[1; 32], "another-id").to_bytes()
        );
    }

    #[test]
    fn a_clone_with_the_state_is_another_runtime() {
        let original = runtime_id("00112233445566778899aabbccddeeff", Some("uuid-vm1"));
        let clone = runtime_id("00112233445566778899aabbccddeeff", Some("uuid-vm1-copy"));
        assert_ne!(original, clone);
        assert_eq!(original.len(), 32);
        // The same machine keeps its id across restarts, whatever the UUID's case.
        assert_eq!(
            original,
            runtime_id("00112233445566778899aabbccddeeff", Some("UUID-VM1"))
        );
    }

    #[test]
    fn without_a_uuid_the_stored_part_is_the_id() {
        assert_eq!(runtime_id("abc", None), "abc");
    }
}
