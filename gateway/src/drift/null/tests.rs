use super::*;

#[test]
fn the_grid_rounds_down_and_keeps_small_windows() {
    for m in [1, 15, 16, 17, 499, 500, 501, 1000, 2000, 123_456] {
        let g = round_down(m);
        assert!(
            g <= m && g as f64 >= m as f64 / 2f64.powf(1.0 / 8.0) - 1.0,
            "{m} -> {g}"
        );
    }
    assert_eq!(round_down(500), round_down(round_down(500)));
}

#[test]
fn with_many_samples_per_bin_the_null_is_the_chi_square_one() {
    // 10 equal bins, n = 20,000, m = 2,000: 200 samples per bin, where the approximation holds.
    let shares = vec![0.1; 10];
    let null = simulate(Statistic::Psi, &shares, 20_000, 2_000, 0.995, 1);
    let scale = 1.0 / 20_000.0 + 1.0 / 2_000.0;
    let chi2 = metrics::chi2_quantile(0.99, 9.0) * scale;
    assert!((null.q99 / chi2 - 1.0).abs() < 0.1, "{null:?} vs {chi2}");
    assert!((null.mean / (9.0 * scale) - 1.0).abs() < 0.05, "{null:?}");
    assert!(null.q_over > null.q99);
}

#[test]
fn with_few_samples_per_bin_the_tail_is_heavier_than_chi_square() {
    // 100 bins, m = 500: 5 per bin. The chi-square quantile is what let a quarter of windows
    // drawn like the reference through (issue 14); the simulated one is higher.
    let shares = vec![0.01; 100];
    let null = simulate(Statistic::Psi, &shares, 20_000, 500, 0.995, 2);
    let chi2 = metrics::chi2_quantile(0.99, 99.0) * (1.0 / 20_000.0 + 1.0 / 500.0);
    assert!(null.q99 > 1.2 * chi2, "{null:?} vs {chi2}");
}

#[test]
fn the_same_inputs_give_the_same_thresholds() {
    let mut a = NullTable::default();
    let mut b = NullTable::default();
    let shares = [0.7, 0.2, 0.1];
    let x = a.get(Statistic::Js, &shares, 20_000, 1000, 0.995);
    let y = b.get(Statistic::Js, &shares, 20_000, 1000, 0.995);
    assert_eq!(x, y);
    // m rounds down to the grid: 1010 and 1000 share an entry.
    a.get(Statistic::Js, &shares, 20_000, 1010, 0.995);
    assert_eq!(a.len(), 1);
}

#[test]
fn binomial_draws_have_the_right_moments() {
    let mut rng = Rng::new(9);
    for (n, p) in [(500u64, 0.01), (20_000, 0.1), (40, 0.9)] {
        let draws: Vec<f64> = (0..20_000).map(|_| rng.binomial(n, p) as f64).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        let (want_mean, want_var) = (n as f64 * p, n as f64 * p * (1.0 - p));
        assert!(
            (mean - want_mean).abs() < 0.03 * want_mean + 0.05,
            "{n} {p}: {mean}"
        );
        assert!(
            (var / want_var - 1.0).abs() < 0.06,
            "{n} {p}: {var} vs {want_var}"
        );
    }
    let mut out = [0u64; 3];
    rng.multinomial(1000, &[0.5, 0.3, 0.2], &mut out);
    assert_eq!(out.iter().sum::<u64>(), 1000);
}
