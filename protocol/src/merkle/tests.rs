use alloc::vec::Vec;

use super::*;

fn leaves(n: usize) -> Vec<Hash> {
    (0..n).map(|i| leaf(&(i as u32).to_be_bytes())).collect()
}

#[test]
fn every_leaf_of_every_shape_verifies() {
    for n in 1..=33 {
        let l = leaves(n);
        let r = root(&l);
        for i in 0..n {
            let p = proof(&l, i);
            assert!(verify(&r, i as u64, n as u64, l[i], &p), "n={n} i={i}");
            assert!(p.len() <= 6);
        }
    }
}

#[test]
fn all_proofs_equal_the_single_proofs() {
    for n in [1usize, 2, 3, 7, 8, 9, 64, 65] {
        let l = leaves(n);
        let all = all_proofs(&l);
        for (i, p) in all.iter().enumerate() {
            assert_eq!(*p, proof(&l, i), "n={n} i={i}");
        }
    }
}

#[test]
fn wrong_leaf_index_count_or_path_fails() {
    let l = leaves(10);
    let r = root(&l);
    let p = proof(&l, 3);
    assert!(!verify(&r, 3, 10, l[4], &p), "another leaf");
    assert!(!verify(&r, 4, 10, l[3], &p), "another index");
    // A count that changes the tree shape changes the path length; the count itself comes
    // from the signed manifest.
    assert!(!verify(&r, 3, 5, l[3], &p), "another tree shape");
    assert!(!verify(&r, 10, 10, l[3], &p), "index out of range");
    let mut bad = p.clone();
    bad[1][0] ^= 1;
    assert!(!verify(&r, 3, 10, l[3], &bad), "tampered path");
    assert!(!verify(&r, 3, 10, l[3], &p[1..]), "short path");
}

#[test]
fn known_root_matches_rfc6962_construction() {
    // Two leaves: root = H(0x01 || H(0x00 || a) || H(0x00 || b)).
    let a = leaf(b"a");
    let b = leaf(b"b");
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(a);
    h.update(b);
    let want: Hash = h.finalize().into();
    assert_eq!(root(&[a, b]), want);
    // Three leaves split 2 + 1.
    let c = leaf(b"c");
    assert_eq!(root(&[a, b, c]), node(&root(&[a, b]), &c));
}
