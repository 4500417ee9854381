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
