//! `vigil suite --shard K/N`: a deterministic share of the scenarios for one of N parallel jobs,
//! so that the N shards together run every scenario exactly once.

use std::fmt;
use std::str::FromStr;

/// Most shards a suite may be split into.
pub const MAX_SHARDS: u32 = 1000;

/// Shard `index` (from 1) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which shard, from 1.
    pub index: u32,
    /// How many shards.
    pub count: u32,
}

/// Why a shard argument is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a shard: write K/N with 1 ≤ K ≤ N ≤ {MAX_SHARDS}, e.g. 2/4")]
pub struct BadShard(String);

impl FromStr for Shard {
    type Err = BadShard;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadShard(text.to_owned());
        let (index, count) = text.split_once('/').ok_or_else(bad)?;
        let index: u32 = index.trim().parse().map_err(|_| bad())?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if index == 0 || index > count || count > MAX_SHARDS {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// This shard's share of `names`: sorted by name, every `count`-th from the `index`-th, so
    /// the share does not depend on the order the names come in.
    pub fn select<T>(&self, items: Vec<T>, name: impl Fn(&T) -> &str) -> Vec<T> {
        let mut items = items;
        items.sort_by(|a, b| name(a).cmp(name(b)));
        items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| u32::try_from(*i).unwrap_or(u32::MAX) % self.count == self.index - 1)
            .map(|(_, item)| item)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_name_exactly_once_whatever_the_order() {
        let names: Vec<String> = (0..47).map(|i| format!("s{i:02}")).collect();
        let mut reversed = names.clone();
        reversed.reverse();
        for count in 1..=7 {
            let mut seen = Vec::new();
            for index in 1..=count {
                let shard = Shard { index, count };
                let a = shard.select(names.clone(), |n| n.as_str());
                let b = shard.select(reversed.clone(), |n| n.as_str());
                assert_eq!(a, b, "order-independent");
                seen.extend(a);
            }
            seen.sort();
            assert_eq!(seen, names, "{count} shards");
        }
    }

    #[test]
    fn shard_arguments_are_checked() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        for bad in ["0/4", "5/4", "1/0", "x/2", "3", "1/1001", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
