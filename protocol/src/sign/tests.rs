use alloc::vec;

use super::*;

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn public(n: u8) -> [u8; 32] {
    key(n).verifying_key().to_bytes()
}

#[test]
fn threshold_counts_distinct_trusted_keys() {
    let body = b"release 7".to_vec();
    let signed = Signed::sign(Domain::Manifest, body.clone(), &[key(1), key(2)]);
    let trusted = [public(1), public(2), public(3)];
    assert_eq!(signed.verify(Domain::Manifest, &trusted, 1), Ok(&body[..]));
    assert_eq!(signed.verify(Domain::Manifest, &trusted, 2), Ok(&body[..]));
    assert_eq!(
        signed.verify(Domain::Manifest, &trusted, 3),
        Err(SigError::BelowThreshold {
            valid: 2,
            needed: 3
        })
    );
    assert_eq!(
        signed.verify(Domain::Manifest, &trusted, 0),
        Ok(&body[..]),
        "threshold 0 means 1"
    );
}

#[test]
fn a_key_counts_once_and_unknown_keys_are_ignored() {
    let mut signed = Signed::sign(Domain::Manifest, b"x".to_vec(), &[key(1)]);
    let dup = signed.signatures[0].clone();
    signed.signatures.push(dup);
    signed.add_signature(Domain::Manifest, &key(9));
    let trusted = [public(1), public(2)];
    assert_eq!(
        signed.verify(Domain::Manifest, &trusted, 2),
        Err(SigError::BelowThreshold {
            valid: 1,
            needed: 2
        })
    );
    assert_eq!(
        signed.verify(Domain::Manifest, &[public(3)], 1),
        Err(SigError::NoTrustedSignature)
    );
}

#[test]
fn tampered_body_or_other_domain_fails() {
    let signed = Signed::sign(Domain::Manifest, b"release 7".to_vec(), &[key(1)]);
    let mut tampered = signed.clone();
    tampered.body[8] = b'9';
    assert_eq!(
        tampered.verify(Domain::Manifest, &[public(1)], 1),
        Err(SigError::BadSignature)
    );
    assert_eq!(
        signed.verify(Domain::Rollback, &[public(1)], 1),
        Err(SigError::BadSignature)
    );
    // A site request signed by the same key is no manifest, and the other way round.
    let request = Signed::sign(Domain::SiteRequest, b"release 7".to_vec(), &[key(1)]);
    assert_eq!(
        request.verify(Domain::Manifest, &[public(1)], 1),
        Err(SigError::BadSignature)
    );
    assert_eq!(
        signed.verify(Domain::SiteRequest, &[public(1)], 1),
        Err(SigError::BadSignature)
    );
    assert_eq!(
        request.verify(Domain::SiteRequest, &[public(1)], 1),
        Ok(&b"release 7"[..])
    );
    let mut flipped = signed.clone();
    flipped.signatures[0].signature[0] ^= 1;
    assert_eq!(
        flipped.verify(Domain::Manifest, &[public(1)], 1),
        Err(SigError::BadSignature)
    );
}

#[test]
fn cosigning_replaces_a_keys_old_signature() {
    let mut signed = Signed::sign(Domain::Manifest, b"x".to_vec(), &[key(1)]);
    signed.add_signature(Domain::Manifest, &key(1));
    signed.add_signature(Domain::Manifest, &key(2));
    assert_eq!(signed.signatures.len(), 2);
    let many = Signed {
        body: vec![],
        signatures: vec![signed.signatures[0].clone(); MAX_SIGNATURES + 1],
    };
    assert_eq!(
        many.verify(Domain::Manifest, &[public(1)], 1),
        Err(SigError::TooManySignatures)
    );
}

#[test]
fn key_id_is_a_public_key_digest_prefix() {
    let id = key_id(&public(1));
    let digest: [u8; 32] = Sha256::digest(public(1)).into();
    assert_eq!(id, digest[..8]);
}
