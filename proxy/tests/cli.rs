//! The binary's command line: bad configuration is refused with file, line and reason.

use std::process::Command;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
}

#[test]
fn bad_bootstrap_exits_2_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(
        &path,
        "agent = \"a\"\nphase = \"critical\"\n[listen]\noutbound = \"not an address\"\n",
    )
    .unwrap();
    let out = proxy().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4:", path.display())),
        "stderr: {err}"
    );
}

#[test]
fn bad_snapshot_at_start_exits_2_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snapshot.toml");
    std::fs::write(&snap, "version = 1\n[[services]]\nname = \"Not A Name\"\n").unwrap();
    let boot = dir.path().join("sidecar.toml");
    std::fs::write(
        &boot,
        format!(
            "agent = \"a\"\nphase = \"critical\"\n[listen]\noutbound = \"127.0.0.1:0\"\n\
             admin = \"127.0.0.1:0\"\n[snapshot]\nfile = {:?}\n",
            snap.display().to_string()
        ),
    )
    .unwrap();
    let out = proxy().arg("--config").arg(&boot).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:", snap.display())),
        "stderr: {err}"
    );
    assert!(err.contains("services[0].name"), "stderr: {err}");
}

#[test]
fn unknown_argument_is_a_usage_error() {
    let out = proxy().arg("--frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: mesh-proxy"));
}
