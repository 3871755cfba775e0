use super::*;

fn device(name: &str, stage: usize, order: u64) -> RolloutDevice {
    RolloutDevice {
        device: name.into(),
        stage,
        order,
        state: DeviceState::Pending,
        transfer: None,
        from: None,
        updated_ms: 0,
    }
}

#[test]
fn counts_and_queues_follow_states_stages_and_presence() {
    let mut m = Members::new(3);
    m.insert(device("a", 0, 0), true);
    m.insert(device("b", 0, 1), false);
    m.insert(device("c", 1, 2), true);
    m.insert(device("d", 2, 3), true);
    assert_eq!(m.ready().collect::<Vec<_>>(), ["a"]);
    assert_eq!(m.later().collect::<Vec<_>>(), ["c", "d"]);
    assert_eq!(m.present_upto(0), 1, "b is away");
    assert_eq!(m.control_after(0), 2);
    m.update("a", |d| d.state = DeviceState::Updating);
    assert_eq!(m.updating_online(), 1);
    assert!(m.waiting_upto(0));
    m.set_online("a", false);
    assert_eq!((m.updating_online(), m.present_upto(0)), (0, 1));
    assert!(
        !m.waiting_upto(0),
        "an offline update does not hold the stage"
    );
    // c is pulled forward into stage 0.
    m.update("c", |d| d.stage = 0);
    assert_eq!(m.ready().collect::<Vec<_>>(), ["c"]);
    m.set_current(2);
    assert_eq!(m.ready().collect::<Vec<_>>(), ["c", "d"]);
    m.update("d", |d| {
        d.state = DeviceState::Failed { reason: "x".into() }
    });
    assert_eq!((m.counts(2).failed, m.counts(2).finished), (1, 1));
    m.check();
}

proptest::proptest! {
    /// Any sequence of changes leaves the indexes equal to a count from scratch.
    #[test]
    fn the_indexes_follow_every_change(steps in proptest::collection::vec((0u8..5, 0usize..6, 0u8..8), 1..200)) {
        let mut m = Members::new(4);
        for i in 0..6 {
            m.insert(device(&format!("d{i}"), i % 4, i as u64), i % 2 == 0);
        }
        for (what, who, n) in steps {
            let name = format!("d{who}");
            match what {
                0 => m.set_online(&name, n % 2 == 0),
                1 => {
                    m.update(&name, |d| d.stage = usize::from(n) % 4);
                }
                2 => {
                    let state = match n % 6 {
                        0 => DeviceState::Pending,
                        1 => DeviceState::Updating,
                        2 => DeviceState::Installed,
                        3 => DeviceState::Failed { reason: String::new() },
                        4 => DeviceState::TimedOut,
                        _ => DeviceState::Healthy,
                    };
                    m.update(&name, |d| d.state = state);
                }
                3 => m.set_current(usize::from(n) % 4),
                _ => m.insert(device(&name, usize::from(n) % 4, u64::from(n)), n % 3 == 0),
            }
            m.check();
        }
    }
}
