//! `cargo xtask bench tls [--size 1G] [--runs N]`: the pre-copy pass-0
//! throughput of `ramblock migrate` over mutual TLS 1.3 (AES-GCM) against
//! plain TCP, measured in the same run.
//!
//! Builds the release binary, makes a CA and two certificates with the
//! `openssl` command (under `target/bench-tls`), then runs the one-process
//! migration (`--size`, increment workload: every page holds data, so
//! every page is encrypted) `--runs` times each way, interleaved (plain,
//! TLS, plain, TLS, ...), and reads each run's pass 0 line (`MiB/s`). It
//! prints the medians and the ratio TLS / plain against the 0.8x target.
//! A run that fails or does not verify makes the bench fail.

use crate::bench::opt;
use std::path::{Path, PathBuf};
use std::process::Command;

const USAGE: &str = "usage: cargo xtask bench tls [--size 1G] [--runs N]";
/// TLS must keep at least this share of plain TCP's pass-0 throughput.
const TARGET: f64 = 0.8;

pub(super) struct Options {
    size: u64,
    runs: usize,
}

pub(super) fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        size: 1 << 30,
        runs: 3,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || opt::value(&mut args, arg, USAGE);
        match arg.as_str() {
            "--size" => o.size = super::migrate::parse_size(value()?)?,
            "--runs" => {
                o.runs = opt::positive(value()?)
                    .ok_or_else(|| format!("--runs needs a count of at least 1; {USAGE}"))?
            }
            other => return Err(format!("unknown option `{other}`; {USAGE}")),
        }
    }
    Ok(o)
}

/// Runs `openssl ARGS` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run openssl ({e}); install it: apt-get install openssl"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A CA and a certificate for 127.0.0.1 (both sides use it: the
/// one-process run presents the same files on each side).
fn pki(dir: &Path) -> Result<[PathBuf; 3], String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=bench-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "host.key",
                "-out",
                "host.csr",
                "-subj",
                "/CN=bench-host",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").map_err(|e| e.to_string())?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "host.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "host.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    )?;
    Ok([
        dir.join("host.pem"),
        dir.join("host.key"),
        dir.join("ca.pem"),
    ])
}

/// Pass 0's MiB/s from a text-mode run's stderr.
fn pass0_mib_s(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.starts_with("pass  0:"))?;
    let before = line.split(" MiB/s").next()?;
    before
        .rsplit([',', ' '])
        .find(|w| !w.is_empty())?
        .parse()
        .ok()
}

/// One migration; its pass-0 throughput.
fn migrate(binary: &Path, size: u64, tls: Option<&[PathBuf; 3]>) -> Result<f64, String> {
    let mut cmd = Command::new(binary);
    // One stream on both: the program opens page channels by default, and
    // this compares the encryption of one stream with none.
    cmd.args([
        "migrate",
        "--size",
        &format!("{}M", size >> 20),
        "--channels",
        "0",
    ]);
    if let Some([cert, key, ca]) = tls {
        cmd.arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .arg("--tls-ca")
            .arg(ca);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run ramblock: {e}"))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if !out.status.success() || !stdout.lines().any(|l| l.trim() == "verified") {
        return Err(format!(
            "the migration failed or did not verify:\n{stdout}{stderr}"
        ));
    }
    pass0_mib_s(&stderr).ok_or_else(|| format!("no pass 0 line in:\n{stderr}"))
}

pub(super) fn bench(o: &Options) -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm: the guest runs under KVM".into());
    }
    let binary = super::ramblock_run::build_ramblock()?;
    let target = crate::target_dir().map_err(|e| e.to_string())?;
    let files = pki(&target.join("bench-tls"))?;
    let (mut plain, mut tls, mut failed) = (Vec::new(), Vec::new(), 0);
    for n in 1..=o.runs {
        for (name, with, into) in [("plain", None, &mut plain), ("tls", Some(&files), &mut tls)] {
            match migrate(&binary, o.size, with) {
                Ok(v) => {
                    println!("run {n}/{}: {name:<5} pass 0 {v:>8.0} MiB/s", o.runs);
                    into.push(v);
                }
                Err(e) => {
                    println!("run {n}/{}: {name:<5} failed: {e}", o.runs);
                    failed += 1;
                }
            }
        }
    }
    let (p, t) = (
        super::migrate::median(plain).unwrap_or(0.0),
        super::migrate::median(tls).unwrap_or(0.0),
    );
    let ratio = if p > 0.0 { t / p } else { 0.0 };
    println!(
        "\n{} MiB increment, pass 0 (medians)\nplain TCP        {p:>8.0} MiB/s\nmutual TLS 1.3   {t:>8.0} MiB/s\nTLS / plain      {ratio:>8.2}x (target >= {TARGET}x: {})",
        o.size >> 20,
        if ratio >= TARGET { "met" } else { "missed" }
    );
    if failed > 0 {
        return Err(format!("{failed} runs failed (see above)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pass_0_line_is_read() {
        let err = "pass  0: dirty   262144 pages, sent   261897 +      247 zero,     192 MiB/s, throttle  0%,    26412 left (~537 ms)\npass  1: dirty 1 pages, sent 1 + 0 zero, 5 MiB/s";
        assert_eq!(pass0_mib_s(err), Some(192.0));
        assert_eq!(pass0_mib_s("nothing"), None);
    }
}
