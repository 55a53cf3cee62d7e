//! `deploy/deploy.sh` against a stand-in `docker` (tests/deploy/docker) that records its calls
//! and reports the health the test scripts: phases in order, canary first, a failing canary
//! rolled back and the run stopped, a healthy run completed, a re-run a no-op. The canary is
//! judged against the policy's `[rollout]` thresholds, per phase, as `mesh-control render`
//! writes them for deploy.sh.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A copy of the deployment (script, rendered files, policy) whose canaries are watched for one
/// sample (`watch = "0s"` in its policy, rendered), and the stand-in first on PATH.
struct Site {
    dir: tempfile::TempDir,
}

/// The site's `[rollout]`: the shipped thresholds, watched for one sample.
const ROLLOUT: &str = "[rollout]\ncanary_percent = 10\nwatch = \"0s\"\nmax_error_rate = 0.05\n\
    max_p99 = \"2s\"\n";

impl Site {
    fn new() -> Self {
        Self::with_rollout(ROLLOUT)
    }

    /// A site whose policy's `rollout.toml` is `rollout`, rendered as an operator would.
    fn with_rollout(rollout: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let copy = |from: &str, to: &str| {
            let status = Command::new("cp")
                .arg("-R")
                .arg(repo().join(from))
                .arg(root.join(to))
                .status()
                .unwrap();
            assert!(status.success(), "cp {from}");
        };
        std::fs::create_dir_all(root.join("deploy/env")).unwrap();
        std::fs::create_dir_all(root.join("config")).unwrap();
        copy("docker-compose.yml", "docker-compose.yml");
        for sub in ["deploy.sh", "generated", "prometheus", "otel", "grafana"] {
            copy(&format!("deploy/{sub}"), &format!("deploy/{sub}"));
        }
        copy("config/mesh", "config/mesh");
        std::fs::write(root.join("config/mesh/rollout.toml"), rollout).unwrap();
        let policy = mesh_config::policy::load_dir(&root.join("config/mesh")).unwrap();
        let files = mesh_control::render::render(&policy, &registry()).unwrap();
        mesh_control::render::write(&root, &files).unwrap();
        // The compose secrets, made by the real `mesh-control secrets` into the copy.
        let secrets = Command::new(mesh_tests::control::binary_path())
            .current_dir(repo())
            .args(["secrets", "--root"])
            .arg(&root)
            .output()
            .unwrap();
        assert!(secrets.status.success(), "{secrets:?}");
        std::fs::write(root.join("deploy/env/test.env"), "HOST_BIND=127.0.0.1\n").unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::copy(
            repo().join("tests/deploy/docker"),
            dir.path().join("bin/docker"),
        )
        .unwrap();
        Site { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Runs deploy.sh; `errors` are agents whose sidecars report a 50 % error rate.
    fn deploy(&self, phase: &str, errors: &str) -> (Output, Vec<String>) {
        self.deploy_with(phase, errors, "")
    }

    /// As [`Site::deploy`]; the services named in `unhealthy` report unhealthy.
    fn deploy_with(&self, phase: &str, errors: &str, unhealthy: &str) -> (Output, Vec<String>) {
        let standin = self.dir.path().join("standin");
        let _ = std::fs::remove_file(standin.join("calls"));
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("bash")
            .arg(self.root().join("deploy/deploy.sh"))
            .args(["--env", "test", "--phase", phase, "--timeout", "0"])
            .env("PATH", path)
            .env("STANDIN_DIR", &standin)
            .env("STANDIN_ERRORS", errors)
            .env("STANDIN_UNHEALTHY", unhealthy)
            .env("DEPLOY_POLL_SECONDS", "0")
            .env("DEPLOY_STATE_DIR", self.dir.path().join("state"))
            .output()
            .unwrap();
        let calls = std::fs::read_to_string(standin.join("calls")).unwrap_or_default();
        (out, calls.lines().map(str::to_owned).collect())
    }
}

fn log(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The services each `compose up` started, in call order.
fn started(calls: &[String]) -> Vec<Vec<String>> {
    calls
        .iter()
        .filter_map(|c| c.split_once(" up --detach "))
        .map(|(_, rest)| {
            rest.split(' ')
                .filter(|a| !a.starts_with("--"))
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

fn registry() -> mesh_config::Registry {
    mesh_config::registry::load_file(&repo().join("config/mesh/agents.toml")).unwrap()
}

#[test]
fn without_the_secrets_nothing_starts_and_the_reason_is_given() {
    let site = Site::new();
    std::fs::remove_dir_all(site.root().join("deploy/secrets")).unwrap();
    let (out, calls) = site.deploy("all", "");
    assert!(!out.status.success());
    assert!(log(&out).contains("mesh-control secrets"), "{}", log(&out));
    assert!(started(&calls).is_empty(), "{calls:?}");
}

#[test]
fn a_healthy_run_goes_phase_by_phase_canary_first_and_a_rerun_changes_nothing() {
    let site = Site::new();
    let (out, calls) = site.deploy("all", "");
    assert!(out.status.success(), "{}", log(&out));
    let ups = started(&calls);
    let registry = registry();
    let phase_of = |s: &str| {
        let agent = s.trim_end_matches("-sidecar");
        registry
            .agents
            .iter()
            .find(|a| a.name == agent)
            .map(|a| a.phase.as_str())
            .unwrap_or("infrastructure")
    };
    // infrastructure, then per agent phase: canary, then the rest.
    let order: Vec<&str> = ups.iter().map(|u| phase_of(&u[0])).collect();
    assert_eq!(
        order,
        [
            "infrastructure",
            "critical",
            "critical",
            "performance",
            "performance",
            "specialized",
            "specialized"
        ]
    );
    for (i, phase) in [(1, "critical"), (3, "performance"), (5, "specialized")] {
        let n = registry
            .agents
            .iter()
            .filter(|a| a.phase.as_str() == phase)
            .count();
        let canary = ups[i].len() / 2;
        assert_eq!(canary, (n * 10).div_ceil(100), "{phase}: 10 % canary");
        assert_eq!(canary + ups[i + 1].len() / 2, n, "{phase}: every agent");
        assert!(ups[i].iter().all(|s| phase_of(s) == phase));
    }
    assert!(log(&out).contains("deploy: done"));

    let (out, calls) = site.deploy("all", "");
    assert!(out.status.success(), "{}", log(&out));
    assert!(
        started(&calls).is_empty(),
        "a re-run started: {:?}",
        started(&calls)
    );
    assert_eq!(
        log(&out)
            .matches("unchanged and healthy: nothing to do")
            .count(),
        4
    );
}

#[test]
fn a_failing_canary_is_removed_and_the_run_stops() {
    let site = Site::new();
    // The first critical agent in name order is the canary.
    let (out, calls) = site.deploy("all", "agent-orchestrator");
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    let text = log(&out);
    assert!(
        text.contains("canary agent-orchestrator: error rate 0.5 above 0.05"),
        "{text}"
    );
    let ups = started(&calls);
    assert_eq!(ups.len(), 2, "infrastructure and the canary only: {ups:?}");
    assert_eq!(ups[1], ["agent-orchestrator", "agent-orchestrator-sidecar"]);
    // Never deployed before: the canary is removed.
    assert!(calls
        .iter()
        .any(|c| c.ends_with("stop agent-orchestrator agent-orchestrator-sidecar")));
    assert!(calls
        .iter()
        .any(|c| c.ends_with("rm --force agent-orchestrator agent-orchestrator-sidecar")));
}

#[test]
fn a_phase_that_fails_after_its_canary_passed_is_rolled_back_and_the_run_stops() {
    let site = Site::new();
    let mut critical: Vec<String> = registry()
        .agents
        .iter()
        .filter(|a| a.phase.as_str() == "critical")
        .map(|a| a.name.clone())
        .collect();
    critical.sort();
    // The canary (the first in name order) is healthy; the second agent of the phase is not.
    let sick = &critical[1];
    let (out, calls) = site.deploy_with("all", "", sick);
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    let text = log(&out);
    assert!(text.contains("canary healthy"), "{text}");
    assert!(
        text.contains(&format!("phase 'critical' not healthy after 0s: {sick}")),
        "{text}"
    );
    let ups = started(&calls);
    assert_eq!(
        ups.len(),
        3,
        "infrastructure, the canary, the rest: {ups:?}"
    );
    // Never deployed before: the whole phase is removed, the canary with it, and no later
    // phase starts.
    let removal = calls
        .iter()
        .find(|c| c.contains(" rm --force "))
        .unwrap_or_else(|| panic!("the phase was not removed: {calls:?}"));
    for agent in &critical {
        assert!(
            removal.contains(&format!(" {agent} ")) || removal.ends_with(&format!(" {agent}")),
            "{agent} not removed: {removal}"
        );
    }
}

#[test]
fn a_failing_canary_of_a_changed_phase_rolls_back_to_the_last_good_configuration() {
    let site = Site::new();
    let (out, _) = site.deploy("all", "");
    assert!(out.status.success(), "{}", log(&out));
    // A new image for the critical agents.
    let compose = site.root().join("docker-compose.yml");
    let text = std::fs::read_to_string(&compose).unwrap();
    std::fs::write(&compose, text.replace(":1.0.0", ":1.1.0")).unwrap();

    let (out, calls) = site.deploy("critical", "agent-orchestrator");
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    let last_good = site.dir.path().join("state/last-good");
    let rollback = calls
        .iter()
        .find(|c| c.contains(&format!("--project-directory {}", last_good.display())))
        .unwrap_or_else(|| panic!("no rollback to the saved configuration: {calls:?}"));
    assert!(
        rollback.ends_with("up --detach --no-deps agent-orchestrator agent-orchestrator-sidecar")
    );
    assert!(log(&out).contains("rolled back"), "{}", log(&out));
}

#[test]
fn each_phase_is_judged_by_its_own_thresholds_from_the_policy() {
    // Every sidecar of the stand-in reports p99 0.25 s. Critical allows 50 % errors, so its
    // erring canary passes; performance allows a p99 of 100 ms, so its canary fails.
    let site = Site::with_rollout(&format!(
        "{ROLLOUT}[rollout.phases.critical]\nmax_error_rate = 0.6\n\
         [rollout.phases.performance]\nmax_p99 = \"100ms\"\n"
    ));
    let (out, calls) = site.deploy("all", "agent-orchestrator");
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    let text = log(&out);
    assert!(
        text.contains("against error rate 0.6, p99 2s"),
        "critical's thresholds: {text}"
    );
    assert!(text.contains("phase 'critical' healthy"), "{text}");
    assert!(
        text.contains("canary api-contract-validator: p99 0.25s above 0.1s"),
        "{text}"
    );
    // Infrastructure, critical's canary and rest, performance's canary: then the stop.
    assert_eq!(started(&calls).len(), 4, "{:?}", started(&calls));
}

#[test]
fn canary_settings_in_an_environment_file_are_refused() {
    let site = Site::new();
    std::fs::write(
        site.root().join("deploy/env/test.env"),
        "HOST_BIND=127.0.0.1\nCANARY_MAX_ERROR_RATE=0.5\n",
    )
    .unwrap();
    let (out, calls) = site.deploy("all", "");
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    assert!(
        log(&out).contains("CANARY_MAX_ERROR_RATE is set") && log(&out).contains("rollout.toml"),
        "{}",
        log(&out)
    );
    assert!(started(&calls).is_empty());
}

#[test]
fn a_phase_waits_for_the_phases_before_it() {
    let site = Site::new();
    // Nothing deployed yet: critical needs infrastructure first.
    let (out, calls) = site.deploy("critical", "");
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    assert!(
        log(&out).contains("phase 'critical' needs phase 'infrastructure' first"),
        "{}",
        log(&out)
    );
    assert!(started(&calls).is_empty());
    let (out, _) = site.deploy("infrastructure", "");
    assert!(out.status.success(), "{}", log(&out));
    // Specialized also needs critical and performance.
    let (out, calls) = site.deploy("specialized", "");
    assert_eq!(out.status.code(), Some(1), "{}", log(&out));
    assert!(
        log(&out).contains("needs phase 'critical' first"),
        "{}",
        log(&out)
    );
    assert!(started(&calls).is_empty());
    let (out, calls) = site.deploy("critical", "");
    assert!(out.status.success(), "{}", log(&out));
    assert_eq!(started(&calls).len(), 2, "canary, then the rest");
}
