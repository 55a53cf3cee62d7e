//! `mesh-control [run] [options]`, `mesh-control validate DIR` and `mesh-control compliance`:
//! parse arguments, build the runtime, handle signals.

use mesh_control::consul::watch::Params;
use mesh_control::{Config, Source};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage:
  mesh-control [run] [--listen ADDR] [--policy DIR] [--consul HOST:PORT | --catalog FILE]
                     [--poll DURATION] [--max-catalog-drop PERCENT] [--admit-warning]
                     [--catalog-state FILE] [--log LEVEL] [--operator-token-file FILE]
                     [--agent-tokens FILE (--state-dir DIR | --ca-cert FILE --ca-key FILE)
                      [--trust-domain NAME] [--cert-lifetime DURATION]
                      [--tls-name NAME]... [--tls-ip IP]...]
      Serves snapshots to sidecars. Defaults: --listen 127.0.0.1:15100, --policy config/mesh,
      --catalog config/local/catalog.toml, --poll 1s, --max-catalog-drop 50.
      A catalog losing more than PERCENT of its services or endpoints at once (or all of
      them) is held back until it recovers or an operator confirms it with
      POST /v1/catalog/confirm and `Authorization: Bearer $MESH_CONTROL_TOKEN`;
      100 never holds. The same operator token guards /status; --operator-token-file reads it
      from a file (a compose secret) instead. --catalog-state keeps each published catalog in
      FILE, so a restart judges its first read against it (a partly recovered Consul is held,
      not published). --admit-warning routes Consul instances whose checks warn.
      With --agent-tokens (a TOML file of agent = \"token\"), the process is the mesh's CA:
      it signs sidecars' CSRs (POST /v1/certificate) into certificates naming
      spiffe://NAME/agent/AGENT (--trust-domain, default mesh) valid for --cert-lifetime
      (default 12h). Its key is kept in --state-dir (made on first start) or read from
      --ca-cert/--ca-key. It then serves its API over TLS 1.3 only, with a certificate of its
      own CA for the names sidecars dial (--tls-name, default mesh-control and localhost;
      --tls-ip, default 127.0.0.1 and the --listen address), renewed like a sidecar's;
      sidecars trust the CA certificate ([control] ca_file).
  mesh-control validate DIR
      Checks the policy files in DIR and the agent registry DIR/agents.toml when present;
      prints every error as file:line: reason and the budget's oversubscription; exits 1 on
      error.
  mesh-control render [--policy DIR] [--root DIR] [--check]
      Renders the deployment from DIR/agents.toml and the policy in DIR into the repository at
      --root: docker-compose.yml and deploy/generated/ (sidecar bootstraps, seed snapshot,
      Prometheus targets). --check writes nothing and exits 1 naming each file that differs.
      Defaults: --policy config/mesh, --root .
  mesh-control compliance --deployment [ROOT] [--json]
      Checks the rendered deployment under ROOT (default .) offline: limits, ports, Rule 26
      hardening, healthchecks, fixed addresses, logging, and Rule 30's named checks as
      pass / fail / not applicable with evidence and a score; exits 1 on a violation.
  mesh-control compliance [--status-url URL] [--ca-file FILE] [--token-file FILE]
                          [--timeout DURATION]
      Checks a running mesh (Rules 17, 27, 30): the control process's /status, and every
      sidecar it lists (admin /health and /metrics, snapshot version); prints a table; exits 1
      when a check fails. Defaults: --status-url http://127.0.0.1:15100/status, --timeout 5s.
      An https:// URL (a control process with identity on) is verified against --ca-file, the
      mesh CA certificate. The operator token comes from --token-file or MESH_CONTROL_TOKEN.
  mesh-control secrets [--policy DIR] [--root DIR]
      Makes what the rendered deployment's compose secrets name, under ROOT/deploy/secrets/
      (never checked in): the mesh CA, a random bootstrap token per agent of the registry
      with the control process's tokens file, and the operator token. Existing files are
      kept: re-run it after adding an agent. Defaults: --policy config/mesh, --root .";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("validate") => return validate(&args[1..]),
        Some("compliance") => return compliance(&args[1..]),
        Some("render") => return render(&args[1..]),
        Some("secrets") => return secrets(&args[1..]),
        Some("run") => {
            args.remove(0);
        }
        Some("--help" | "-h") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("mesh-control {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let (cfg, level) = match parse_run(args) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("mesh-control: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_log(&level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("mesh-control")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> ExitCode {
    let running = match mesh_control::start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("mesh-control: {e}");
            return ExitCode::from(2);
        }
    };
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("mesh-control: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    // Nothing to drain: sidecars keep their snapshot and reconnect to another instance.
    tracing::info!(signal = sig, "stopping");
    running.shutdown().await;
    ExitCode::SUCCESS
}

fn validate(args: &[String]) -> ExitCode {
    let [dir] = args else {
        eprintln!("mesh-control: validate takes one directory\n{USAGE}");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    // The policy's loading checks the registry too (its Rule 23 declarations are policy).
    let policy = match mesh_config::policy::load_dir(&dir) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            return ExitCode::from(1);
        }
    };
    let registry_path = dir.join(mesh_config::registry::FILE_NAME);
    let registry = if registry_path.exists() {
        match mesh_config::registry::load_file(&registry_path) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    if let Some(registry) = &registry {
        println!(
            "{}: {} agents",
            registry_path.display(),
            registry.agents.len()
        );
        if let Some(report) = mesh_control::budget_engine::for_registry(&policy, registry) {
            for line in mesh_control::budget_engine::oversubscription(&report) {
                println!("budget: {line}");
            }
        }
    }
    println!("{}: ok", dir.display());
    ExitCode::SUCCESS
}

fn render(args: &[String]) -> ExitCode {
    let mut policy_dir = PathBuf::from("config/mesh");
    let mut root = PathBuf::from(".");
    let mut check = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => check = true,
            "--policy" | "--root" => {
                let Some(v) = args.next() else {
                    eprintln!("mesh-control: {arg} needs a value\n{USAGE}");
                    return ExitCode::from(2);
                };
                if arg == "--policy" {
                    policy_dir = v.into();
                } else {
                    root = v.into();
                }
            }
            other => {
                eprintln!("mesh-control: render: unexpected {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let policy = match mesh_config::policy::load_dir(&policy_dir) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(1);
        }
    };
    let registry = match mesh_config::registry::load_file(
        &policy_dir.join(mesh_config::registry::FILE_NAME),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let files = match mesh_control::render::render(&policy, &registry) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("mesh-control: render: {e}");
            return ExitCode::from(1);
        }
    };
    if check {
        let differ = mesh_control::render::diff(&root, &files);
        for path in &differ {
            eprintln!("{}: differs from the rendering", path.display());
        }
        if !differ.is_empty() {
            eprintln!(
                "re-render with: mesh-control render --policy {}",
                policy_dir.display()
            );
            return ExitCode::from(1);
        }
        println!("{} files: as rendered", files.len());
        return ExitCode::SUCCESS;
    }
    match mesh_control::render::write(&root, &files) {
        Ok(changed) => {
            for path in &changed {
                println!("rendered {}", path.display());
            }
            println!("{} files, {} changed", files.len(), changed.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-control: render: {e}");
            ExitCode::from(1)
        }
    }
}

fn secrets(args: &[String]) -> ExitCode {
    let mut policy_dir = PathBuf::from("config/mesh");
    let mut root = PathBuf::from(".");
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (Some(v), "--policy" | "--root") = (args.next(), arg.as_str()) else {
            eprintln!("mesh-control: secrets: unexpected {arg:?}\n{USAGE}");
            return ExitCode::from(2);
        };
        if arg == "--policy" {
            policy_dir = v.into();
        } else {
            root = v.into();
        }
    }
    let registry = match mesh_config::registry::load_file(
        &policy_dir.join(mesh_config::registry::FILE_NAME),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    match mesh_control::deploy_secrets::generate(&root, &registry) {
        Ok(written) => {
            for path in &written {
                println!("made {}", path.display());
            }
            println!("{} files made", written.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-control: secrets: {e}");
            ExitCode::from(1)
        }
    }
}

fn compliance(args: &[String]) -> ExitCode {
    if args.first().map(String::as_str) == Some("--deployment") {
        let mut root = PathBuf::from(".");
        let mut json = false;
        for arg in &args[1..] {
            match arg.as_str() {
                "--json" => json = true,
                a if !a.starts_with('-') => root = a.into(),
                other => {
                    eprintln!("mesh-control: compliance: unexpected {other:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            }
        }
        let report = mesh_control::deployment_check::check_dir(&root);
        if json {
            println!("{}", report.to_json());
        } else {
            println!("{report}\nscore: {}%", report.score());
        }
        return if report.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
    }
    let mut url = "http://127.0.0.1:15100/status".to_owned();
    let mut timeout = Duration::from_secs(5);
    let mut access = mesh_control::compliance::ControlAccess {
        ca_file: None,
        token: std::env::var("MESH_CONTROL_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--status-url", Some(v)) => url = v.clone(),
            ("--ca-file", Some(v)) => access.ca_file = Some(v.into()),
            ("--token-file", Some(v)) => match std::fs::read_to_string(v) {
                Ok(t) if !t.trim().is_empty() => access.token = Some(t.trim().to_owned()),
                Ok(_) => {
                    eprintln!("mesh-control: --token-file: {v} is empty");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("mesh-control: --token-file: {v}: {e}");
                    return ExitCode::from(2);
                }
            },
            ("--timeout", Some(v)) => match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => timeout = d,
                _ => {
                    eprintln!("mesh-control: --timeout: {v:?} is not a duration\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            (other, _) => {
                eprintln!("mesh-control: compliance: unexpected {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(mesh_control::compliance::run_with(&url, timeout, &access));
    println!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn parse_run(args: Vec<String>) -> Result<(Config, String), String> {
    let mut cfg = Config {
        listen: ([127, 0, 0, 1], 15100).into(),
        policy_dir: "config/mesh".into(),
        source: Source::File("config/local/catalog.toml".into()),
        poll_interval: Duration::from_secs(1),
        max_catalog_drop_percent: mesh_control::guard::DEFAULT_MAX_DROP_PERCENT,
        confirm_token: std::env::var("MESH_CONTROL_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        identity: None,
        catalog_state: None,
    };
    let mut admit_warning = false;
    let (mut tokens, mut state_dir, mut ca_cert, mut ca_key) = (None, None, None, None);
    let mut trust_domain = "mesh".to_owned();
    let mut lifetime = Duration::from_secs(12 * 3600);
    let mut level = "info".to_owned();
    let mut server_names = mesh_control::identity::channel::ServerNames::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value()?;
                cfg.listen = v
                    .parse()
                    .map_err(|_| format!("--listen: {v:?} is not ip:port"))?;
            }
            "--policy" => cfg.policy_dir = value()?.into(),
            "--catalog" => cfg.source = Source::File(value()?.into()),
            "--consul" => {
                cfg.source = Source::Consul {
                    address: value()?,
                    params: Params::default(),
                }
            }
            "--poll" => {
                let v = value()?;
                cfg.poll_interval = humantime::parse_duration(&v)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("--poll: {v:?} is not a duration"))?;
            }
            "--max-catalog-drop" => {
                let v = value()?;
                cfg.max_catalog_drop_percent = v
                    .trim_end_matches('%')
                    .parse()
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| format!("--max-catalog-drop: {v:?} is not 0 to 100"))?;
            }
            "--catalog-state" => cfg.catalog_state = Some(value()?.into()),
            "--admit-warning" => admit_warning = true,
            "--operator-token-file" => {
                let v = value()?;
                let token = std::fs::read_to_string(&v)
                    .map_err(|e| format!("--operator-token-file: {v}: {e}"))?;
                let token = token.trim();
                if token.len() < mesh_control::identity::tokens::MIN_TOKEN_LEN {
                    return Err(format!(
                        "--operator-token-file: {v}: a token needs at least {} characters",
                        mesh_control::identity::tokens::MIN_TOKEN_LEN
                    ));
                }
                cfg.confirm_token = Some(token.to_owned());
            }
            "--agent-tokens" => tokens = Some(PathBuf::from(value()?)),
            "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
            "--ca-cert" => ca_cert = Some(PathBuf::from(value()?)),
            "--ca-key" => ca_key = Some(PathBuf::from(value()?)),
            "--trust-domain" => {
                let v = value()?;
                let valid = !v.is_empty()
                    && v.len() <= 253
                    && v.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    });
                if !valid {
                    return Err(format!(
                        "--trust-domain: {v:?} is not a trust domain (lower-case letters, digits, '-', '.')"
                    ));
                }
                trust_domain = v;
            }
            "--cert-lifetime" => {
                let v = value()?;
                lifetime = humantime::parse_duration(&v)
                    .ok()
                    .filter(|d| *d >= Duration::from_secs(1))
                    .ok_or_else(|| {
                        format!("--cert-lifetime: {v:?} is not a duration of 1s or more")
                    })?;
            }
            "--tls-name" => {
                let v = value()?;
                let valid = !v.is_empty()
                    && v.len() <= 253
                    && v.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    });
                if !valid {
                    return Err(format!("--tls-name: {v:?} is not a DNS name"));
                }
                server_names.dns.push(v);
            }
            "--tls-ip" => {
                let v = value()?;
                server_names.ips.push(
                    v.parse()
                        .map_err(|_| format!("--tls-ip: {v:?} is not an IP address"))?,
                );
            }
            "--log" => level = value()?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    use mesh_control::identity::ca::CaSource;
    let ca = match (state_dir, ca_cert, ca_key) {
        (None, None, None) => None,
        (Some(dir), None, None) => Some(CaSource::StateDir(dir)),
        (None, Some(cert), Some(key)) => Some(CaSource::Files { cert, key }),
        _ => return Err("give either --state-dir or both --ca-cert and --ca-key".into()),
    };
    cfg.identity = match (tokens, ca) {
        (None, None) if server_names != Default::default() => {
            return Err("--tls-name and --tls-ip need the mesh CA (--agent-tokens)".into())
        }
        (None, None) => None,
        (Some(tokens), Some(ca)) => Some(mesh_control::IdentityConfig {
            ca,
            trust_domain,
            lifetime,
            tokens,
            server_names: with_default_names(server_names, cfg.listen),
        }),
        (None, Some(_)) => return Err("a CA needs --agent-tokens to know who may ask".into()),
        (Some(_), None) => {
            return Err("--agent-tokens needs --state-dir or --ca-cert/--ca-key".into())
        }
    };
    if let Source::Consul { params, .. } = &mut cfg.source {
        params.health.admit_warning = admit_warning;
    }
    Ok((cfg, level))
}

/// The control channel certificate's names: those given, else `mesh-control` and
/// `localhost`; the addresses given, else loopback and the listen address.
fn with_default_names(
    mut names: mesh_control::identity::channel::ServerNames,
    listen: std::net::SocketAddr,
) -> mesh_control::identity::channel::ServerNames {
    if names.dns.is_empty() {
        names.dns = vec!["mesh-control".into(), "localhost".into()];
    }
    if names.ips.is_empty() {
        names.ips.push(std::net::Ipv4Addr::LOCALHOST.into());
        if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
            names.ips.push(listen.ip());
        }
    }
    names
}

fn init_log(level: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter: Targets = level
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::fmt()
        .json()
        .with_current_span(false)
        .finish()
        .with(filter)
        .init();
}
