use super::*;

#[test]
fn a_block_round_trips_its_rows_and_header() {
    let rows = vec![(10, b"a".to_vec()), (11, Vec::new()), (15, b"xyz".to_vec())];
    let block = encode(&rows);
    assert_eq!(header(&block), Some((3, 15)));
    let back: Vec<(u64, Vec<u8>)> = rows_of(&block);
    assert_eq!(back, rows);
    assert_eq!(header(&encode(&[])), Some((0, 0)));
}

#[test]
fn a_damaged_block_yields_the_rows_before_the_damage() {
    let block = encode(&[(1, b"one".to_vec()), (2, b"two".to_vec())]);
    let cut = &block[..block.len() - 1];
    assert_eq!(rows_of(cut), vec![(1, b"one".to_vec())]);
    assert_eq!(header(&block[..5]), None);
    assert!(rows_of(&[]).is_empty());
}

fn rows_of(block: &[u8]) -> Vec<(u64, Vec<u8>)> {
    rows(block).map(|(k, r)| (k, r.to_vec())).collect()
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_block_reader(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
        let _ = header(&bytes);
        let _ = rows(&bytes).count();
    }
}
