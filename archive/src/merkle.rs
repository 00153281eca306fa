//! Merkle tree hashing, inclusion proofs and consistency proofs as defined by RFC 6962 §2.1 and
//! RFC 9162 §2.1.
//!
//! Leaf hash `SHA-256(0x00 ‖ leaf bytes)`, node hash `SHA-256(0x01 ‖ left ‖ right)`. A tree of `n`
//! leaves splits at `k`, the largest power of two strictly below `n`; the empty tree's root is
//! `SHA-256("")`. [`MerkleTree`] keeps the hash of every complete, aligned subtree (2 × 32 bytes
//! per leaf), so any subtree hash costs O(log n) node hashes and a proof O(log² n).
//!
//! Verification follows RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency). A proof is
//! hostile input: it holds at most [`PROOF_HASHES_MAX`] hashes (two per level of a tree of 2^64
//! leaves), and anything longer is refused before it is walked.

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Most hashes in an inclusion or consistency proof: a consistency proof has at most one hash per
/// level plus one, an inclusion proof one per level; a tree has at most 64 levels.
pub const PROOF_HASHES_MAX: usize = 2 * 64;

const LEAF_PREFIX: u8 = 0x00;
const NODE_PREFIX: u8 = 0x01;

/// `SHA-256(0x00 ‖ leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([LEAF_PREFIX]);
    hasher.update(leaf);
    hasher.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([NODE_PREFIX]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly below `size` (`size` >= 2): where RFC 6962 splits a tree.
fn split_point(size: u64) -> u64 {
    assert!(size >= 2);
    1 << (63 - (size - 1).leading_zeros())
}

/// The leaf hashes of a log and the hashes of its complete aligned subtrees.
#[derive(Clone, Debug, Default)]
pub struct MerkleTree {
    /// `levels[h][i]` is the root of leaves `i·2^h .. (i+1)·2^h`; `levels[0]` are the leaf hashes.
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    pub fn new() -> MerkleTree {
        MerkleTree { levels: vec![Vec::new()] }
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.levels[0].len() as u64
    }

    pub fn leaf(&self, index: u64) -> Option<&Hash> {
        self.levels[0].get(usize::try_from(index).ok()?)
    }

    /// Appends a leaf hash, completing every subtree it closes.
    pub fn push(&mut self, leaf: Hash) {
        let mut hash = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            self.levels[level].push(hash);
            let length = self.levels[level].len();
            if length % 2 == 1 {
                break;
            }
            hash = node_hash(&self.levels[level][length - 2], &self.levels[level][length - 1]);
            level += 1;
        }
    }

    /// Drops every leaf at or after `size` (an append that failed before it became durable).
    pub fn truncate(&mut self, size: u64) {
        assert!(size <= self.size());
        for (level, hashes) in self.levels.iter_mut().enumerate() {
            hashes.truncate((size >> level) as usize);
        }
    }

    /// MTH(D[start:end]), `start < end <= size`.
    pub fn subtree_root(&self, start: u64, end: u64) -> Hash {
        assert!(start < end && end <= self.size(), "subtree {start}..{end} of a tree of {}", self.size());
        let size = end - start;
        if size.is_power_of_two() && start.is_multiple_of(size) {
            let level = size.trailing_zeros() as usize;
            return self.levels[level][(start >> level) as usize];
        }
        let split = split_point(size);
        node_hash(&self.subtree_root(start, start + split), &self.subtree_root(start + split, end))
    }

    /// The root of the first `size` leaves.
    pub fn root(&self, size: u64) -> Hash {
        if size == 0 { empty_root() } else { self.subtree_root(0, size) }
    }

    /// PATH(index, D[0:size]) of RFC 6962 §2.1.1; `None` when `index >= size` or `size` exceeds
    /// the tree.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        if index >= size || size > self.size() {
            return None;
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Some(proof)
    }

    fn path(&self, index: u64, start: u64, end: u64, proof: &mut Vec<Hash>) {
        let size = end - start;
        if size == 1 {
            return;
        }
        let split = split_point(size);
        if index < split {
            self.path(index, start, start + split, proof);
            proof.push(self.subtree_root(start + split, end));
        } else {
            self.path(index - split, start + split, end, proof);
            proof.push(self.subtree_root(start, start + split));
        }
    }

    /// PROOF(first, D[0:second]) of RFC 6962 §2.1.2; empty when `first` is 0 or equals `second`;
    /// `None` when `first > second` or `second` exceeds the tree.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Option<Vec<Hash>> {
        if first > second || second > self.size() {
            return None;
        }
        let mut proof = Vec::new();
        if first > 0 && first < second {
            self.subproof(first, 0, second, true, &mut proof);
        }
        Some(proof)
    }

    fn subproof(&self, first: u64, start: u64, end: u64, whole: bool, proof: &mut Vec<Hash>) {
        let size = end - start;
        if first == size {
            if !whole {
                proof.push(self.subtree_root(start, end));
            }
            return;
        }
        let split = split_point(size);
        if first <= split {
            self.subproof(first, start, start + split, whole, proof);
            proof.push(self.subtree_root(start + split, end));
        } else {
            self.subproof(first - split, start + split, end, false, proof);
            proof.push(self.subtree_root(start, start + split));
        }
    }
}

/// Why a proof did not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not below tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("first tree size {first} is above second tree size {second}")]
    SizesOutOfOrder { first: u64, second: u64 },
    #[error("proof of {hashes} hashes exceeds the limit of {PROOF_HASHES_MAX}")]
    TooLong { hashes: usize },
    #[error("proof has the wrong number of hashes")]
    WrongLength,
    #[error("proof does not lead to the expected root")]
    RootMismatch,
}

/// One step of a proof's walk up the tree, shared by both verifications (RFC 9162 §2.1.3.2 and
/// §2.1.4.2): `node` is the walk's index on its level and `last` the level's last index. Returns
/// whether this step's sibling hash sits on the left, and moves both indexes to the level of the
/// next sibling (past the levels where the node is the last one and has none). A proof longer
/// than the path to the root is `WrongLength`.
fn climb(node: &mut u64, last: &mut u64) -> Result<bool, ProofError> {
    if *last == 0 {
        return Err(ProofError::WrongLength);
    }
    let sibling_on_left = *node & 1 == 1 || *node == *last;
    if sibling_on_left {
        while *node & 1 == 0 && *node != 0 {
            *node >>= 1;
            *last >>= 1;
        }
    }
    *node >>= 1;
    *last >>= 1;
    Ok(sibling_on_left)
}

/// RFC 9162 §2.1.3.2: whether `proof` shows leaf `index` with `leaf` hash in the tree of `size`
/// leaves whose root is `root`.
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if proof.len() > PROOF_HASHES_MAX {
        return Err(ProofError::TooLong { hashes: proof.len() });
    }
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let mut node = index;
    let mut last = size - 1;
    let mut hash = *leaf;
    for sibling in proof {
        if climb(&mut node, &mut last)? {
            hash = node_hash(sibling, &hash);
        } else {
            hash = node_hash(&hash, sibling);
        }
    }
    if last != 0 {
        return Err(ProofError::WrongLength);
    }
    if hash != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2: whether `proof` shows that the tree of `first` leaves with root
/// `first_root` is a prefix of the tree of `second` leaves with root `second_root`.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if proof.len() > PROOF_HASHES_MAX {
        return Err(ProofError::TooLong { hashes: proof.len() });
    }
    if first > second {
        return Err(ProofError::SizesOutOfOrder { first, second });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if first_root == second_root { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    if first == 0 {
        // The empty tree is a prefix of every tree; there is nothing to prove.
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if *first_root == empty_root() { Ok(()) } else { Err(ProofError::RootMismatch) };
    }
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_root);
    }
    path.extend_from_slice(proof);
    let mut node = first - 1;
    let mut last = second - 1;
    while node & 1 == 1 {
        node >>= 1;
        last >>= 1;
    }
    let mut first_hash = path[0];
    let mut second_hash = path[0];
    for sibling in &path[1..] {
        if climb(&mut node, &mut last)? {
            first_hash = node_hash(sibling, &first_hash);
            second_hash = node_hash(sibling, &second_hash);
        } else {
            second_hash = node_hash(&second_hash, sibling);
        }
    }
    if last != 0 {
        return Err(ProofError::WrongLength);
    }
    if first_hash != *first_root || second_hash != *second_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// MTH straight from RFC 6962's recursive definition, over leaf hashes.
    fn naive_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            size => {
                let split = split_point(size as u64) as usize;
                node_hash(&naive_root(&leaves[..split]), &naive_root(&leaves[split..]))
            }
        }
    }

    fn naive_path(index: usize, leaves: &[Hash]) -> Vec<Hash> {
        if leaves.len() <= 1 {
            return Vec::new();
        }
        let split = split_point(leaves.len() as u64) as usize;
        if index < split {
            let mut path = naive_path(index, &leaves[..split]);
            path.push(naive_root(&leaves[split..]));
            path
        } else {
            let mut path = naive_path(index - split, &leaves[split..]);
            path.push(naive_root(&leaves[..split]));
            path
        }
    }

    fn leaves(count: usize) -> Vec<Hash> {
        (0..count).map(|index| leaf_hash(format!("leaf {index}").as_bytes())).collect()
    }

    fn tree(leaves: &[Hash]) -> MerkleTree {
        let mut tree = MerkleTree::new();
        for leaf in leaves {
            tree.push(*leaf);
        }
        tree
    }

    #[test]
    fn known_roots() {
        // RFC 6962 test vectors as used by certificate-transparency-go (merkle/testonly): the
        // leaves are the byte strings below and these are the roots of the first 1..=8 leaves.
        let inputs: [&[u8]; 8] = [
            b"",
            &[0x00],
            &[0x10],
            &[0x20, 0x21],
            &[0x30, 0x31],
            &[0x40, 0x41, 0x42, 0x43],
            &[0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            &[0x60, 0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e, 0x6f],
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let mut tree = MerkleTree::new();
        for (input, expected) in inputs.iter().zip(roots) {
            tree.push(leaf_hash(input));
            assert_eq!(
                protocol::evidence::sha256_hex(&tree.root(tree.size())),
                expected,
                "size {}",
                tree.size()
            );
        }
        assert_eq!(
            protocol::evidence::sha256_hex(&empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn every_proof_of_small_trees_verifies_and_every_tampered_one_fails() {
        let all = leaves(40);
        let tree = tree(&all);
        for size in 1..=all.len() as u64 {
            let root = tree.root(size);
            assert_eq!(root, naive_root(&all[..size as usize]));
            for index in 0..size {
                let proof = tree.inclusion_proof(index, size).unwrap();
                assert_eq!(proof, naive_path(index as usize, &all[..size as usize]));
                assert_eq!(verify_inclusion(index, size, &all[index as usize], &proof, &root), Ok(()));
                let other = (index + 1) % size;
                if other != index {
                    assert!(verify_inclusion(other, size, &all[index as usize], &proof, &root).is_err());
                }
                for position in 0..proof.len() {
                    let mut tampered = proof.clone();
                    tampered[position][0] ^= 1;
                    assert!(verify_inclusion(index, size, &all[index as usize], &tampered, &root).is_err());
                }
                let mut longer = proof.clone();
                longer.push(root);
                assert!(verify_inclusion(index, size, &all[index as usize], &longer, &root).is_err());
            }
            for first in 0..=size {
                let proof = tree.consistency_proof(first, size).unwrap();
                let first_root = tree.root(first);
                assert_eq!(
                    verify_consistency(first, size, &first_root, &root, &proof),
                    Ok(()),
                    "{first}->{size}"
                );
                if first > 0 && first < size {
                    let mut wrong_root = first_root;
                    wrong_root[31] ^= 1;
                    assert!(verify_consistency(first, size, &wrong_root, &root, &proof).is_err());
                    for position in 0..proof.len() {
                        let mut tampered = proof.clone();
                        tampered[position][0] ^= 1;
                        assert!(verify_consistency(first, size, &first_root, &root, &tampered).is_err());
                    }
                    assert!(verify_consistency(first, size, &first_root, &root, &proof[1..]).is_err());
                }
            }
        }
    }

    #[test]
    fn hostile_proofs_are_refused() {
        let hash = leaf_hash(b"x");
        let long = vec![hash; PROOF_HASHES_MAX + 1];
        assert_eq!(
            verify_inclusion(0, u64::MAX, &hash, &long, &hash),
            Err(ProofError::TooLong { hashes: PROOF_HASHES_MAX + 1 })
        );
        assert_eq!(
            verify_consistency(1, u64::MAX, &hash, &hash, &long),
            Err(ProofError::TooLong { hashes: PROOF_HASHES_MAX + 1 })
        );
        assert_eq!(
            verify_inclusion(5, 5, &hash, &[], &hash),
            Err(ProofError::IndexOutOfRange { index: 5, size: 5 })
        );
        assert_eq!(
            verify_consistency(6, 5, &hash, &hash, &[]),
            Err(ProofError::SizesOutOfOrder { first: 6, second: 5 })
        );
        assert!(verify_inclusion(u64::MAX - 1, u64::MAX, &hash, &[hash; 64], &hash).is_err());
        assert!(verify_consistency(u64::MAX - 1, u64::MAX, &hash, &hash, &[hash; 64]).is_err());
    }

    proptest! {
        #[test]
        fn proofs_agree_with_naive_recomputation(size in 1usize..300, index_seed: u64, first_seed: u64) {
            let all = leaves(size);
            let mut tree = tree(&all);
            let size = size as u64;
            let index = index_seed % size;
            let root = naive_root(&all);
            prop_assert_eq!(tree.root(size), root);
            let proof = tree.inclusion_proof(index, size).unwrap();
            prop_assert_eq!(&proof, &naive_path(index as usize, &all));
            prop_assert_eq!(verify_inclusion(index, size, &all[index as usize], &proof, &root), Ok(()));
            let first = first_seed % (size + 1);
            let first_root = naive_root(&all[..first as usize]);
            let consistency = tree.consistency_proof(first, size).unwrap();
            prop_assert_eq!(verify_consistency(first, size, &first_root, &root, &consistency), Ok(()));
            // Truncating gives the same tree as building the prefix.
            tree.truncate(first);
            prop_assert_eq!(tree.root(first), first_root);
            prop_assert_eq!(tree.size(), first);
        }
    }
}
