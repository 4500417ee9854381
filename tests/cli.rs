//! The `smsgw` binary as an operator runs it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn smsgw(config: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(args)
        .env("SMSGW_CONFIG", config)
        .output()
        .expect("smsgw runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("smsgw.db");
    let text = config_text(&db, "127.0.0.1:9".parse().unwrap(), None);
    let path = dir.join("smsgw.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_reports_every_problem_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[messages]\nmax_segments = 0\n[[carriers]]\nname = \"x\"\naddress = \"h:1\"\nwindow = 0\n",
    )
    .unwrap();
    let (ok, text) = smsgw(&path, &["check-config", path.to_str().unwrap()]);
    assert!(!ok);
    for key in [
        "messages.max_segments",
        "carriers[0].window",
        "privacy.pseudonym_key",
    ] {
        assert!(text.contains(key), "{key} missing in: {text}");
    }
    let good = write_config(dir.path());
    let (ok, text) = smsgw(&good, &["check-config", good.to_str().unwrap()]);
    assert!(ok, "{text}");
}

#[test]
fn the_shipped_config_passes_check_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/smsgw.toml");
    let (ok, text) = smsgw(&path, &["check-config", path.to_str().unwrap()]);
    assert!(ok, "{text}");
}

#[test]
fn opt_outs_and_number_changes_are_managed_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());

    let (ok, text) = smsgw(
        &config,
        &["opt-out", "add", "--account", "a", "+46 70 111 11 11"],
    );
    assert!(ok && text.contains("+46701111111 opted out"), "{text}");
    let (ok, text) = smsgw(
        &config,
        &["opt-out", "add", "--account", "a", "+46701111111"],
    );
    assert!(ok && text.contains("already"), "{text}");
    let (ok, text) = smsgw(&config, &["opt-out", "list", "--account", "a"]);
    assert!(ok && text.contains("+46701111111\t*\tcli"), "{text}");
    let (ok, text) = smsgw(&config, &["opt-out", "list", "--account", "b"]);
    assert!(ok && !text.contains("+46701111111"), "{text}");
    let (ok, text) = smsgw(
        &config,
        &["opt-out", "add", "--account", "nobody", "+46701111111"],
    );
    assert!(!ok && text.contains("no account named `nobody`"), "{text}");

    let file = dir.path().join("disconnected.csv");
    std::fs::write(
        &file,
        "number,disconnected\n+46702222222,2025-03-01\nbad,2025-01-01\n",
    )
    .unwrap();
    let (ok, text) = smsgw(
        &config,
        &["number-change", "import", file.to_str().unwrap()],
    );
    assert!(
        ok && text.contains("1 disconnections imported") && text.contains("[3]"),
        "{text}"
    );
    let (ok, text) = smsgw(
        &config,
        &["number-change", "show", "+46702222222", "--account", "a"],
    );
    assert!(
        ok && text.contains("deactivated effective 2025-03-01") && text.contains("all accounts"),
        "{text}"
    );

    // Reports are limited to 48 hours in the past; imports are not.
    let (ok, text) = smsgw(
        &config,
        &[
            "number-change",
            "add",
            "+46703333333",
            "--kind",
            "deactivated",
            "--effective-at",
            "2025-01-01T00:00:00Z",
        ],
    );
    assert!(!ok && text.contains("48 hours"), "{text}");
    let (ok, text) = smsgw(
        &config,
        &[
            "number-change",
            "add",
            "+46703333333",
            "--kind",
            "deactivated",
        ],
    );
    assert!(ok, "{text}");
}

#[test]
fn check_config_refuses_a_tcp_admin_or_metrics_listener_open_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(write_config(dir.path())).unwrap();
    let path = dir.path().join("admin.toml");
    let check = |extra: &str| {
        std::fs::write(&path, format!("{base}\n{extra}")).unwrap();
        smsgw(&path, &["check-config", path.to_str().unwrap()])
    };
    // Every interface, and loopback too (a local browser, local users and the gateway's own
    // webhooks reach it).
    for listen in ["0.0.0.0:8081", "127.0.0.1:8081"] {
        let (ok, text) = check(&format!("[admin]\nlisten = \"{listen}\"\n"));
        assert!(!ok, "{listen}: {text}");
        assert!(
            text.contains("admin.listen:") && text.contains("admin.token"),
            "{text}"
        );
    }
    let (ok, text) = check("[admin]\nlisten = \"0.0.0.0:8081\"\ntoken = \"short\"\n");
    assert!(
        !ok && text.contains("admin.token: must be at least 16"),
        "{text}"
    );
    let (ok, text) =
        check("[admin]\nlisten = \"0.0.0.0:8081\"\ntoken = \"a-long-random-admin-token\"\n");
    assert!(ok, "{text}");
    let (ok, text) = check("[admin]\nenabled = false\nlisten = \"0.0.0.0:8081\"\n");
    assert!(ok, "a disabled listener needs no token: {text}");

    // The metrics listener's config_text default is loopback; another interface needs a token.
    let metrics = base.replace("127.0.0.1:0", "0.0.0.0:9464");
    std::fs::write(&path, &metrics).unwrap();
    let (ok, text) = smsgw(&path, &["check-config", path.to_str().unwrap()]);
    assert!(!ok && text.contains("metrics.listen:"), "{text}");
}

#[test]
fn the_daemon_serves_its_admin_api_on_a_private_socket_that_smsgw_status_uses() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("[http]\nlisten = \"127.0.0.1:0\"\n[logging]\nformat = \"json\"\n{text}"),
    )
    .unwrap();
    let daemon = Daemon::start(&config);

    // By default beside the store, a socket only the gateway's user may open.
    let socket = dir.path().join("admin.sock");
    let meta = std::fs::metadata(&socket).expect("the admin socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let (ok, text) = smsgw(&config, &["status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("\"carriers\"") && text.contains("\"sim\""),
        "{text}"
    );
    let (ok, text) = smsgw(&config, &["carriers", "pause", "sim"]);
    assert!(ok && text.contains("\"paused\": true"), "{text}");

    // A second gateway on the same socket does not take it over.
    let second = Command::new(env!("CARGO_BIN_EXE_smsgw"))
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{refused}");
    assert!(refused.contains("admin.socket"), "{refused}");
    let (ok, text) = smsgw(&config, &["status"]);
    assert!(ok, "the first still answers: {text}");

    // Stopped, it removes its socket; the command then says the gateway does not answer.
    daemon.terminate();
    assert!(!socket.exists(), "the socket is removed at stop");
    let (ok, text) = smsgw(&config, &["status"]);
    assert!(!ok && text.contains("did not answer"), "{text}");
}

#[test]
fn another_user_cannot_use_the_admin_socket() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    // Needs root, to run the command as another user (CI runs as root).
    let probe = dir.path().join("probe");
    std::fs::write(&probe, "").unwrap();
    let root = std::fs::metadata(&probe).unwrap().uid() == 0;
    let runuser = Command::new("runuser").arg("--help").output().is_ok();
    if !root || !runuser {
        eprintln!("skipped: needs root and runuser to act as the user nobody");
        return;
    }
    // Everything but the state the gateway makes is readable by `nobody`.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.path().join("smsgw");
    std::fs::copy(env!("CARGO_BIN_EXE_smsgw"), &binary).unwrap();
    let state = dir.path().join("state");
    let db = state.join("smsgw.db");
    let config = dir.path().join("smsgw.toml");
    let text = config_text(&db, "127.0.0.1:9".parse().unwrap(), None);
    std::fs::write(
        &config,
        format!("[http]\nlisten = \"127.0.0.1:0\"\n[logging]\nformat = \"json\"\n{text}"),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon = Daemon::start(&config);
    let as_nobody = || {
        let output = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&binary)
            .args(["status", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.success(), text)
    };
    // The state directory is the gateway's alone, and so is the socket itself.
    let (ok, text) = as_nobody();
    assert!(!ok && text.contains("no permission"), "{text}");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (ok, text) = as_nobody();
    assert!(!ok && text.contains("no permission"), "{text}");
    let (ok, text) = smsgw(&config, &["status"]);
    assert!(ok, "the gateway's own user is served: {text}");
    daemon.terminate();
}

#[test]
fn check_config_shows_where_a_syntax_error_is_but_never_the_secret_on_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(write_config(dir.path())).unwrap();
    let key_line = r#"pseudonym_key = "test-pseudonym-key-0123456789""#;
    let line_of_key = good.lines().position(|l| l.trim() == key_line).unwrap() + 1;
    let cases = [
        // An unterminated string: the parser's snippet would show the whole line.
        (
            format!("{good}\n[[carriers]]\nname = \"x\"\npassword = \"hunter2\n"),
            "hunter2",
            good.lines().count() + 3,
        ),
        // Not a string: serde's message would quote the number.
        (
            good.replace(key_line, "pseudonym_key = 31415926535"),
            "31415926535",
            line_of_key,
        ),
    ];
    let path = dir.path().join("secret.toml");
    for (text, secret, line) in cases {
        std::fs::write(&path, text).unwrap();
        let (ok, out) = smsgw(&path, &["check-config", path.to_str().unwrap()]);
        assert!(!ok, "{out}");
        assert!(!out.contains(secret), "the secret is shown: {out}");
        assert!(
            out.contains(&format!("line {line},")),
            "no line {line} in: {out}"
        );
    }
}
