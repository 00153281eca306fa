//! Rendezvous (highest random weight) placement: a device goes to the live node with the highest
//! `score(node, device)`. Pure and deterministic, so sinks and devices compute the same order
//! without talking to each other: a device tries sinks in `rank` order.
//!
//! Score: the first 8 bytes (big-endian) of SHA-256(len(node) as u32 BE ‖ node ‖ device). The
//! length prefix keeps ("ab","c") and ("a","bc") apart. SHA-256 rather than a faster hash because
//! every implementation (the appliance, other languages, operators' scripts) must agree forever;
//! placement runs per connection, not per record.
//!
//! Movement: when a node joins, only devices whose new best node is the joiner move (≈ 1/(n+1) of
//! them); when a node leaves, only its own devices move, each to its second choice.

use sha2::{Digest, Sha256};

/// The rendezvous score of `device` on `node`.
pub fn score(node: &str, device: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update((node.len() as u32).to_be_bytes());
    hasher.update(node.as_bytes());
    hasher.update(device.as_bytes());
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// `nodes` in the order `device` should try them: highest score first, ties by node name.
pub fn rank<'a, N: AsRef<str>>(device: &str, nodes: &'a [N]) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> =
        nodes.iter().map(|node| (score(node.as_ref(), device), node.as_ref())).collect();
    ranked.sort_by(|left, right| right.0.cmp(&left.0).then(left.1.cmp(right.1)));
    ranked.dedup_by(|later, earlier| later.1 == earlier.1);
    ranked.into_iter().map(|(_, node)| node).collect()
}

/// The node `device` belongs to, if any node is live.
pub fn owner<'a, N: AsRef<str>>(device: &str, nodes: &'a [N]) -> Option<&'a str> {
    nodes
        .iter()
        .map(|node| node.as_ref())
        .max_by(|left, right| score(left, device).cmp(&score(right, device)).then(right.cmp(left)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(count: usize) -> Vec<String> {
        (0..count).map(|index| format!("cam-{index:05}")).collect()
    }

    #[test]
    fn score_is_stable() {
        // Golden values: changing the score function moves every device in every fleet.
        assert_eq!(score("sink-a", "cam-00001"), score("sink-a", "cam-00001"));
        assert_ne!(score("ab", "c"), score("a", "bc"));
        let golden = format!("{:016x}", score("sink-a", "cam-00001"));
        assert_eq!(golden.len(), 16);
        assert_eq!(golden, GOLDEN_SINK_A_CAM_00001);
    }

    // Computed independently: python3 hashlib.sha256(struct.pack(">I", 6) + b"sink-a" + b"cam-00001").
    const GOLDEN_SINK_A_CAM_00001: &str = "afd7187866431ab4";

    #[test]
    fn owner_is_first_of_rank_and_rank_is_a_permutation() {
        let nodes = ["sink-a", "sink-b", "sink-c", "sink-d"];
        for device in devices(500) {
            let ranked = rank(&device, &nodes);
            assert_eq!(ranked.len(), nodes.len());
            assert_eq!(Some(ranked[0]), owner(&device, &nodes));
            let mut sorted = ranked.clone();
            sorted.sort();
            assert_eq!(sorted, nodes);
        }
        assert_eq!(owner::<&str>("cam", &[]), None);
        assert_eq!(rank("cam", &["a", "a"]), vec!["a"]);
    }

    #[test]
    fn balanced() {
        let nodes = ["sink-a", "sink-b", "sink-c"];
        let all = devices(9000);
        for node in nodes {
            let count = all.iter().filter(|device| owner(device, &nodes) == Some(node)).count();
            assert!((2700..=3300).contains(&count), "{node} owns {count} of 9000");
        }
    }

    #[test]
    fn join_moves_only_to_the_joiner() {
        let before = ["sink-a", "sink-b", "sink-c"];
        let after = ["sink-a", "sink-b", "sink-c", "sink-d"];
        let all = devices(8000);
        let mut moved = 0;
        for device in &all {
            let old = owner(device, &before).unwrap();
            let new = owner(device, &after).unwrap();
            if old != new {
                assert_eq!(new, "sink-d", "{device} moved {old} → {new}, not to the joiner");
                moved += 1;
            }
        }
        // ≈ 1/4 of 8000.
        assert!((1700..=2300).contains(&moved), "{moved} of 8000 moved");
    }

    #[test]
    fn leave_moves_only_the_leavers_devices_to_their_second_choice() {
        let before = ["sink-a", "sink-b", "sink-c"];
        let after = ["sink-a", "sink-c"];
        for device in devices(5000) {
            let old = owner(&device, &before).unwrap();
            let new = owner(&device, &after).unwrap();
            if old != "sink-b" {
                assert_eq!(old, new, "{device} moved though its node stayed");
            } else {
                assert_eq!(new, rank(&device, &before)[1]);
            }
        }
    }
}
