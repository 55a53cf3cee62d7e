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

#[test]
fn a_bad_registry_entry_is_named_with_file_and_line() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/mesh");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let registry = dir.path().join("agents.toml");
    let text = std::fs::read_to_string(&registry).unwrap();
    // The second critical agent takes the first one's port.
    std::fs::write(&registry, text.replacen("port = 10301", "port = 10300", 1)).unwrap();
    let line = std::fs::read_to_string(&registry)
        .unwrap()
        .lines()
        .position(|l| l == "port = 10300")
        .map(|first| first + 1)
        .unwrap();
    let out = control().arg("validate").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&registry).unwrap();
    let second = text
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "port = 10300")
        .nth(1)
        .map(|(i, _)| i + 1)
        .unwrap();
    assert!(second > line);
    assert!(
        stderr.contains(&format!(
            "agents.toml:{second}: agents[1].port: 10300 is already used by \"senior-ai-engineer\""
        )),
        "{stderr}"
    );
}

#[test]
fn render_check_names_a_hand_edited_file() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let policy = repo.join("config/mesh");
    let out = control()
        .arg("render")
        .arg("--policy")
        .arg(&policy)
        .arg("--root")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = || {
        control()
            .args(["render", "--check", "--policy"])
            .arg(&policy)
            .arg("--root")
            .arg(dir.path())
            .output()
            .unwrap()
    };
    assert!(check().status.success());
    let sidecar = dir
        .path()
        .join("deploy/generated/sidecars/senior-ai-engineer.toml");
    let text = std::fs::read_to_string(&sidecar).unwrap();
    std::fs::write(
        &sidecar,
        text.replace("max_concurrency", "max_concurrency = 1000\n#"),
    )
    .unwrap();
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("deploy/generated/sidecars/senior-ai-engineer.toml: differs from the rendering"));
}
