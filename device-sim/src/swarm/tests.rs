//! Tests of the load clients' pure parts: payload padding and refusal names.

use super::*;

#[test]
fn padding_reaches_about_the_requested_size() {
    for encoding in [Encoding::Postcard, Encoding::Json] {
        let size = |n, features| {
            encode(&template("pad", 0, n, features), encoding)
                .unwrap()
                .len()
        };
        let bare = size(0, 4);
        // Below the bare message nothing is added.
        assert_eq!(
            padding(bare, 4, encoding).unwrap(),
            (0, 4, bare),
            "{encoding:?}"
        );
        for want in [bare + 1, 1000, 4096, 16_000] {
            let (samples, features, got) = padding(want, 4, encoding).unwrap();
            assert!(samples > 0 && features >= 4, "{encoding:?} {want}");
            assert_eq!(got, size(samples, features), "{encoding:?} {want}");
            // At least the size asked for, with the fewest samples that get there.
            assert!(got >= want, "{encoding:?}: asked {want}, got {got}");
            assert!(size(samples - 1, features) < want, "{encoding:?} {want}");
        }
    }
}

#[test]
fn padding_adds_features_when_samples_run_out_and_refuses_the_impossible() {
    // 256 samples of 4 features hold about 4 KiB in postcard: 40 KB needs more features.
    let (samples, features, got) = padding(40_000, 4, Encoding::Postcard).unwrap();
    assert!(
        features > 4 && samples <= limits::MAX_SAMPLES,
        "{samples} x {features}"
    );
    assert!(got >= 40_000);
    let small = padding(10, 4, Encoding::Postcard).unwrap();
    assert_eq!(
        (small.0, small.1),
        (0, 4),
        "no padding below the bare message"
    );
    let err = padding(10_000_000, 4, Encoding::Postcard).unwrap_err();
    assert!(err.contains("at most about"), "{err}");
}

#[test]
fn refusals_are_named() {
    use rumqttc::ConnectReturnCode as C;
    assert_eq!(
        refusal_name(C::BadUserNamePassword),
        "bad_user_name_or_password"
    );
    assert_eq!(refusal_name(C::ServiceUnavailable), "server_unavailable");
}
