//! A Merkle tree over an artifact's chunks (the RFC 6962 construction), so a device verifies
//! each chunk on arrival against one root in the signed manifest, with a proof of
//! `log2(chunks)` hashes, however many chunks there are.
//!
//! Leaves are `SHA-256(0x00 || chunk)`, inner nodes `SHA-256(0x01 || left || right)`; the
//! prefixes keep a leaf from passing as an inner node. A tree of `n` leaves splits at the largest
//! power of two below `n`.

use alloc::vec::Vec;

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf(chunk: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(chunk);
    h.finalize().into()
}

fn node(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Largest power of two strictly below `n` (n >= 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// Root of the tree over `leaves` (leaf hashes). The root of no leaves is `SHA-256("")`.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path of leaf `index`: sibling hashes from the leaf up.
pub fn proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    let mut path = Vec::new();
    let mut range = leaves;
    let mut i = index;
    let mut stack = Vec::new();
    while range.len() > 1 {
        let k = split(range.len());
        if i < k {
            stack.push(root(&range[k..]));
            range = &range[..k];
        } else {
            stack.push(root(&range[..k]));
            range = &range[k..];
            i -= k;
        }
    }
    while let Some(h) = stack.pop() {
        path.push(h);
    }
    path
}

/// The audit paths of every leaf at once, in O(n log n) hashing (calling [`proof`] for each
/// leaf would recompute subtree roots over and over).
pub fn all_proofs(leaves: &[Hash]) -> Vec<Vec<Hash>> {
    fn walk(range: &[Hash], out: &mut [Vec<Hash>]) -> Hash {
        match range.len() {
            0 => Sha256::digest([]).into(),
            1 => range[0],
            n => {
                let k = split(n);
                let (left_out, right_out) = out.split_at_mut(k);
                let left = walk(&range[..k], left_out);
                let right = walk(&range[k..], right_out);
                for p in left_out.iter_mut() {
                    p.push(right);
                }
                for p in right_out.iter_mut() {
                    p.push(left);
                }
                node(&left, &right)
            }
        }
    }
    let mut out = alloc::vec![Vec::new(); leaves.len()];
    walk(leaves, &mut out);
    out
}

/// Checks that `leaf_hash` is leaf `index` of a tree of `count` leaves with `root`.
pub fn verify(root: &Hash, index: u64, count: u64, leaf_hash: Hash, path: &[Hash]) -> bool {
    if index >= count {
        return false;
    }
    // Walk the path from the leaf up: at each level decide whether the sibling is on the left
    // or the right, reconstructing the splits top-down first.
    let mut sides = Vec::new();
    let (mut lo, mut n) = (0u64, count);
    while n > 1 {
        let k = split(n as usize) as u64;
        if index < lo + k {
            sides.push(false); // we are on the left; sibling on the right
            n = k;
        } else {
            sides.push(true); // we are on the right; sibling on the left
            lo += k;
            n -= k;
        }
    }
    if sides.len() != path.len() {
        return false;
    }
    let mut h = leaf_hash;
    for (sibling, ours_right) in path.iter().zip(sides.iter().rev()) {
        h = if *ours_right {
            node(sibling, &h)
        } else {
            node(&h, sibling)
        };
    }
    h == *root
}

#[cfg(test)]
mod tests;
