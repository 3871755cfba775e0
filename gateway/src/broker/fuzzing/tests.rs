use super::script::*;
use super::sessions;

#[test]
fn an_empty_script_runs() {
    let outcome = sessions(&[]).unwrap();
    assert_eq!(outcome.connections, 0);
}
