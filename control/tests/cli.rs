//! The binary's command line: `validate` accepts the shipped policy and names bad files' lines.

use std::path::Path;
use std::process::Command;

fn control() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mesh-control"))
}

#[test]
fn shipped_policy_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh");
    let out = control().arg("validate").arg(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_argument_is_a_usage_error() {
    let out = control().arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
}

#[test]
fn a_drop_limit_outside_0_to_100_is_a_usage_error() {
    for bad in ["150", "-1", "half"] {
        let out = control()
            .args(["--max-catalog-drop", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--max-catalog-drop"), "{err}");
    }
}
