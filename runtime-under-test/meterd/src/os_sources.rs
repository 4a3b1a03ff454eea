//! What the operating system gives every part of the runtime: randomness and the wall clock.

/// The operating system could not give randomness.
#[derive(Debug, thiserror::Error)]
#[error("No randomness from the operating system: {0}")]
pub struct NoRandomness(pub getrandom::Error);

/// 32 fresh random bytes (keys, ids, nonces).
pub fn entropy() -> Result<[u8; 32], NoRandomness> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(NoRandomness)?;
    Ok(bytes)
}

/// The wall clock in milliseconds since the Unix epoch (0 before it).
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_differs_between_calls_and_the_clock_is_past_2020() {
        assert_ne!(entropy().unwrap(), entropy().unwrap());
        assert!(wall_clock_ms() > 1_577_836_800_000);
    }
}
